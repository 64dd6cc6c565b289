#!/usr/bin/env bash
# A qemu-img stand-in for scripts/make-upgrade-fixture.py, passed to strata with
# --qemu-img. It runs the real qemu-img, except that the fixture script can make one
# chosen call hold (so the job calling it stays `running` until strata is killed) or
# fail. Nothing else uses it.
#
# The gate directory ($UPGRADE_FIXTURE_GATE) holds `plan`: "<N> <action>". The next N
# calls that write an image go through; the one after gets <action>, then the plan is
# spent and every call goes through again:
#   hold-before  hold before running (the step has not started)
#   hold-after   run it, then hold (the step is done, the job has not heard back)
#   fail         exit 1 without running it
# A held call writes `held.<pid>` ("before"/"after" and its arguments) and holds while
# that file exists: deleting it releases the call. Read-only calls (info, measure,
# map, check without -r, --version) always go through and are not counted.
set -u
real=${UPGRADE_FIXTURE_REAL_QEMU_IMG:?}
gate=${UPGRADE_FIXTURE_GATE:?}

case "${1:-}" in
create | commit | rebase | resize | convert | amend | snapshot) writes=1 ;;
check) [[ " $* " == *" -r "* ]] && writes=1 || writes=0 ;;
*) writes=0 ;;
esac
((writes)) || exec "$real" "$@"

action=run
{
    flock 9
    if read -r left planned <"$gate/plan" 2>/dev/null; then
        if ((left > 0)); then
            echo "$((left - 1)) $planned" >"$gate/plan"
        elif ((left == 0)); then
            action=$planned
            echo "-1 spent" >"$gate/plan"
        fi
    fi
    echo "$$ $action $*" >>"$gate/calls"
} 9>"$gate/lock"

hold() {
    # `sleep` runs as a child with its output closed, so a held call keeps nothing of
    # strata's open; strata's death kills this shell (PR_SET_PDEATHSIG survives exec).
    echo "$*" >"$gate/held.$$.tmp" && mv "$gate/held.$$.tmp" "$gate/held.$$"
    while [[ -e "$gate/held.$$" ]]; do sleep 0.05 </dev/null >/dev/null 2>&1; done
}

case "$action" in
run) exec "$real" "$@" ;;
hold-before)
    hold before "$@"
    exec "$real" "$@"
    ;;
hold-after)
    "$real" "$@" || exit $?
    hold after "$@"
    exit 0
    ;;
fail)
    echo "qemu-img: injected failure (upgrade fixture)" >&2
    exit 1
    ;;
*)
    echo "upgrade-fixture-qemu-img: unknown action $action" >&2
    exit 2
    ;;
esac
