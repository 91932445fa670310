"""Issue 10's "tiltlm/ has fewer lines than before the redesign (6,129) for the same features", estimated
on a tree that has since gained the features of later issues.

The estimate is  6,129 + (the redesign's net lines) + (a trim's net lines on the old features' code):
* the redesign's net: lines added minus lines deleted in tiltlm/ by its commits (REDESIGN below: the
  trainer's and the commands' halves and their follow-ups), which restructured the old features only
  (f1c2a0f also carries about 120 lines of issue 11's precision work, counted here against us);
* a trim from BASE to REV: each line it deletes is classed by the commit that wrote it (git blame at
  BASE): written before the redesign or by it ("old"), or by a later feature commit; the lines it adds
  are shared between the two in the proportion of its deletions.

What blame cannot tell: a feature commit that edited an old line owns it, so "old" undercounts the old
features' share of what the trim removed. Read the figure as an estimate, not a proof.

    python benchmarks/lines_by_origin.py [REV [BASE]]     # defaults: HEAD and da0bdbf (before the trim)
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

BEFORE = 6129  # lines of tiltlm/ at f1c2a0f^, the tree before the redesign
REDESIGN = ("f1c2a0f 7731d10 61b05fb a3f079a 084282b e74cb95 3ecf449 28cc736 785be15 56efe03 43e8ea0 "
            "beccdf1").split()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def net_lines(commit: str) -> int:
    rows = [line.split("\t") for line in git("show", "--numstat", "--format=", commit, "--", "tiltlm").splitlines()]
    return sum(int(added) - int(deleted) for added, deleted, path in rows if path.endswith(".py"))


def deleted_by_origin(rev: str, base: str) -> tuple[Counter, int]:
    """Lines the change base..rev deletes from tiltlm/*.py, by origin; and the number it adds."""
    old = set(git("rev-list", f"{REDESIGN[0]}^").split()) | {git("rev-parse", c).strip() for c in REDESIGN}
    deleted, added, blame = Counter(), 0, {}
    for line in git("diff", "-U0", base, rev, "--", "tiltlm").splitlines():
        if line.startswith("--- "):
            path = line[6:]
            blame = {} if not path.endswith(".py") else {
                number: header.split()[0] for number, header in enumerate(
                    (h for h in git("blame", "--line-porcelain", base, "--", path).splitlines()
                     if re.match(r"[0-9a-f]{40} ", h)), start=1)}
        hunk = re.match(r"@@ -(\d+)(?:,(\d+))? \+\d+(?:,(\d+))? @@", line)
        if hunk and blame:
            start, count = int(hunk[1]), 1 if hunk[2] is None else int(hunk[2])  # "-5" is one line
            deleted.update("old" if blame[n] in old else "features" for n in range(start, start + count))
            added += 1 if hunk[3] is None else int(hunk[3])
    return deleted, added


def main(rev: str = "HEAD", base: str = "da0bdbf") -> None:
    redesign = sum(net_lines(commit) for commit in REDESIGN)
    deleted, added = deleted_by_origin(rev, base)
    share = deleted["old"] / max(1, sum(deleted.values()))
    trim = round(added * share) - deleted["old"]
    print(f"redesign: {redesign:+d} lines net; {base}..{rev}: deletes {deleted['old']} old-feature lines and "
          f"{deleted['features']} later-feature lines, adds {added} ({share:.0%} counted as old)")
    print(f"old features now: about {BEFORE} {redesign:+d} {trim:+d} = {BEFORE + redesign + trim} lines "
          f"(before the redesign: {BEFORE})")


if __name__ == "__main__":
    main(*sys.argv[1:])
