from im_repro.report import main

main()
