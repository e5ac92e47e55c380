# Shared by the launch scripts: `run CMD...` prints CMD (dry run) or runs it.
dry_run="${DRY_RUN:-0}"
run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
# The repository as a tarball of its committed files (what gets copied to remote machines).
package() {
  local out="$1"
  run git -C "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" archive --format=tar.gz -o "$out" HEAD
}
