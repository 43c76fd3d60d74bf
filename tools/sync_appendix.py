"""Copy rebel.py's shared appendix into its siblings: run after changing anything below rebel.py's banner.

- rloo.py, iterative_dpo.py, ppo.py and dpo.py get rebel.py's text from the banner line to the end of the file.
- sft.py, reward.py and rebel_lcm.py carry only the helpers they need: each top-level function or class that they
  define under a name rebel.py's appendix also defines is replaced by rebel.py's copy, and a helper of rebel.py's
  appendix that they call but lack is added.

    python tools/sync_appendix.py           # rewrite the siblings
    python tools/sync_appendix.py --check   # only say which differ (exit 1 if any); tests/test_skeleton.py runs this
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "same in every script"
WHOLE = ["rloo.py", "iterative_dpo.py", "ppo.py", "dpo.py"]
HELPERS = ["sft.py", "reward.py", "rebel_lcm.py"]


def split_at_banner(source: str, name: str) -> tuple[str, str]:
    """The text above the banner line, and the banner line with everything after it."""
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and BANNER in line]
    if not starts:
        raise SystemExit(f"{name} has no banner line (a comment containing '{BANNER}')")
    return "".join(lines[: starts[0]]), "".join(lines[starts[0] :])


def definitions(source: str) -> dict[str, tuple[int, int]]:
    """Top-level function and class name -> (first line, last line), 0-based, decorators included."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out[node.name] = (start - 1, node.end_lineno)
    return out


def synced(name: str, anchor: str) -> str:
    """The sibling's source with rebel.py's shared text in place."""
    source = open(os.path.join(ROOT, name)).read()
    _, appendix = split_at_banner(anchor, "rebel.py")
    if name in WHOLE:
        return split_at_banner(source, name)[0] + appendix
    offset = len(anchor.splitlines()) - len(appendix.splitlines())
    shared = {k: (a, b) for k, (a, b) in definitions(anchor).items() if a >= offset}
    anchor_lines, lines = anchor.splitlines(keepends=True), source.splitlines(keepends=True)
    for key, (a, b) in sorted(definitions(source).items(), key=lambda kv: -kv[1][0]):  # from the end: lines stay put
        if key in shared and key not in ("Args", "main"):
            lines[a:b] = anchor_lines[shared[key][0] : shared[key][1]]
    # A shared helper that the copies call and the sibling lacks goes in after the one before it in rebel.py.
    order = sorted(shared, key=lambda k: shared[k][0])
    while missing := sorted(set(order) & calls(lines, shared) - set(definitions("".join(lines)))):
        have = definitions("".join(lines))
        before = [k for k in order[: order.index(missing[0])] if k in have]
        at = have[before[-1]][1] if before else len(lines)
        lines[at:at] = ["\n\n", *anchor_lines[shared[missing[0]][0] : shared[missing[0]][1]]]
        lines = "".join(lines).splitlines(keepends=True)
    return "".join(lines)


def calls(lines: list[str], shared: dict) -> set[str]:
    """Every name that the sibling's copies of rebel.py's helpers read."""
    copies = [ast.parse("".join(lines[a:b])) for k, (a, b) in definitions("".join(lines)).items() if k in shared]
    return {n.id for tree in copies for n in ast.walk(tree) if isinstance(n, ast.Name)}


if __name__ == "__main__":
    check = "--check" in sys.argv
    anchor = open(os.path.join(ROOT, "rebel.py")).read()
    stale = []
    for name in WHOLE + HELPERS:
        new = synced(name, anchor)
        if new != open(os.path.join(ROOT, name)).read():
            stale.append(name)
            if not check:
                open(os.path.join(ROOT, name), "w").write(new)
    if check and stale:
        raise SystemExit(f"these differ from rebel.py's appendix: {stale}; run python tools/sync_appendix.py")
    print(("stale: " if check else "rewritten: ") + (", ".join(stale) or "none"))
