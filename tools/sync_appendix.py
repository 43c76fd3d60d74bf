"""Copy rebel.py's shared appendix into its siblings: run after changing anything below rebel.py's banner.

The rule: below its banner, each script carries, word for word and in rebel.py's order, the helpers of rebel.py's
appendix that it calls (directly or through another helper). rebel.py, the anchor, holds every one of them; a
sibling's text below the banner is rebel.py's without the helpers it does not call (and a section left empty).

    python tools/sync_appendix.py           # rewrite the siblings
    python tools/sync_appendix.py --check   # only say which differ (exit 1 if any); tests/test_skeleton.py runs this
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNER = "same in every script"
SIBLINGS = ["rloo.py", "iterative_dpo.py", "ppo.py", "dpo.py", "sft.py", "reward.py", "rebel_lcm.py"]


def split_at_banner(source: str, name: str) -> tuple[str, str]:
    """The text above the banner line, and the banner line with everything after it."""
    lines = source.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and BANNER in line]
    if not starts:
        raise SystemExit(f"{name} has no banner line (a comment containing '{BANNER}')")
    return "".join(lines[: starts[0]]), "".join(lines[starts[0] :])


def names(source: str) -> set[str]:
    """Every name the source reads."""
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def appendix_for(above: str, appendix: str) -> str:
    """rebel.py's appendix with only the helpers that `above` (a script's text above its banner) calls, directly or
    through another helper. A top-level statement's block includes the section header (`# ----`) right above it."""
    lines, body = appendix.splitlines(), ast.parse(appendix).body
    blocks = []  # (name or None, section header or None, text)
    for node in body:
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))]) - 1
        header = lines[start - 1] if lines[start - 1].startswith("# ----") else None
        blocks.append((getattr(node, "name", None), header, "\n".join(lines[start : node.end_lineno])))
    first = min(node.lineno for node in body) - 1 - (blocks[0][1] is not None)
    helpers = {name: text for name, _, text in blocks if name}
    own = {n.name for n in ast.parse(above).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    wanted = (names(above) | {n for name, _, text in blocks if not name for n in names(text)}) - own
    kept, todo = set(), wanted & set(helpers)
    while todo:  # the helpers that the kept ones call
        kept |= todo
        todo = {n for name in todo for n in names(helpers[name])} & set(helpers) - kept
    out, section, header = ["\n".join(lines[:first]).rstrip("\n")], None, None
    for name, own_header, text in blocks:
        header = own_header or header
        if name is None or name in kept:
            out.append((header + "\n" if header and header != section else "") + text)
            section = header
    return "\n\n\n".join(out) + "\n"


if __name__ == "__main__":
    check = "--check" in sys.argv
    anchor = split_at_banner(open(os.path.join(ROOT, "rebel.py")).read(), "rebel.py")
    stale = []
    for name in SIBLINGS:
        source = open(os.path.join(ROOT, name)).read()
        above = split_at_banner(source, name)[0]
        new = above + appendix_for(above, anchor[1])
        if new != source:
            stale.append(name)
            if not check:
                open(os.path.join(ROOT, name), "w").write(new)
    if check and stale:
        raise SystemExit(f"these differ from rebel.py's appendix: {stale}; run python tools/sync_appendix.py")
    print(("stale: " if check else "rewritten: ") + (", ".join(stale) or "none"))
