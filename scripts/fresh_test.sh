#!/usr/bin/env bash
# make test-fresh: the default suite as a fresh machine would run it, from this machine.
#
#   scripts/fresh_test.sh [--no-shared] [MAKE_TARGET...]      (default target: test)
#
# Clones the committed HEAD into a temporary folder (uncommitted changes are not tested), puts ../shared beside the
# clone when this checkout has one (--no-shared leaves it out, as on a user's clone), hides SLURM's commands and
# bubblewrap (system packages a fresh machine lacks) from PATH, points the project's caches at empty folders, and
# runs `make test` there: `make setup` builds a new venv and the artifacts, so a missing install step or a test that
# leans on what this machine happens to have fails here.
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
shared=yes
if [ "${1:-}" = "--no-shared" ]; then shared=no; shift; fi
targets=("${@:-test}")

work=$(mktemp -d "${TMPDIR:-/tmp}/im-repro-fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # the PATH built below must resolve for the sandbox tests' throwaway uids too
git clone -q "$repo" "$work/im-repro"
echo "fresh clone of $(git -C "$work/im-repro" rev-parse --short HEAD) in $work/im-repro"
if [ "$shared" = yes ] && [ -d "$repo/../shared" ]; then
  ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
  echo "../shared beside it"
else
  echo "no ../shared beside it"
fi

# Each PATH folder holding one of these commands is replaced by a folder of links to everything else in it.
hidden=(srun sbatch sinfo squeue scontrol scancel salloc bwrap)
path=()
IFS=: read -ra dirs <<<"$PATH"
for i in "${!dirs[@]}"; do
  dir=${dirs[$i]}
  has=no
  for cmd in "${hidden[@]}"; do [ -e "$dir/$cmd" ] && has=yes; done
  if [ "$has" = no ]; then path+=("$dir"); continue; fi
  shadow="$work/path/$i"
  mkdir -p "$shadow"
  for f in "$dir"/*; do
    name=${f##*/}
    [[ " ${hidden[*]} " == *" $name "* ]] || ln -s "$f" "$shadow/$name"
  done
  path+=("$shadow")
done
PATH=$(IFS=:; echo "${path[*]}")
export PATH
for cmd in "${hidden[@]}"; do
  if command -v "$cmd" >/dev/null; then echo "could not hide $cmd" >&2; exit 1; fi
done

export IM_REPRO_CACHE="$work/cache/im-repro" HF_HOME="$work/cache/huggingface"
cd "$work/im-repro"
start=$SECONDS
status=0
for target in "${targets[@]}"; do  # one at a time, each timed (the first also builds the venv and the artifacts)
  begun=$SECONDS
  make "$target" || status=$?
  echo "make $target in a fresh clone: exit $status after $((SECONDS - begun)) s"
  [ "$status" -eq 0 ] || break
done
echo "make ${targets[*]} in a fresh clone: exit $status after $((SECONDS - start)) s"
exit "$status"
