"""The shared appendix is the same in every script: below its banner line, each sibling carries, word for word and in
rebel.py's order, the helpers of rebel.py's appendix that it calls (directly or through another helper), and no other.
A fix lands everywhere (tools/sync_appendix.py copies it) and `diff rebel.py X` shows the algorithm and the helpers X
does without. Scripts never import each other: this test is what keeps their copies in step."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_YET: list[str] = []  # scripts not yet in the one-sitting layout
SIBLINGS = [
    s
    for s in ["ppo.py", "rloo.py", "dpo.py", "iterative_dpo.py", "sft.py", "reward.py", "rebel_lcm.py"]
    if s not in NOT_YET
]
# Every LM script that samples from its policy has the whole sampling and scoring skeleton.
SAMPLING = """first_true_indices truncate_response response_mask forward response_logprobs
sampling_config generate load_policy load_tokenizer load_prompts load_reward_model ScalarRewardModel BadInput exact_div
all_reduce Timer""".split()


def definitions(path: str) -> dict[str, str]:
    """Top-level functions and classes of a script, name -> source (decorators included)."""
    source = open(os.path.join(ROOT, path)).read()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out[node.name] = "\n".join(lines[start - 1 : node.end_lineno])
    return out


def differences(script: str) -> list[str]:
    """Names defined both in rebel.py and in the script whose sources differ."""
    anchor, other = definitions("rebel.py"), definitions(script)
    shared = set(anchor) & set(other) - {"Args", "main"}
    assert shared, f"{script} shares no helper with rebel.py"
    return sorted(name for name in shared if anchor[name] != other[name])


@pytest.mark.parametrize("script", SIBLINGS)
def test_shared_helpers_are_identical_to_rebel(script):
    assert differences(script) == [], f"{script}: these differ from rebel.py; copy them from rebel.py"


@pytest.mark.parametrize("script", ["ppo.py", "rloo.py", "dpo.py", "iterative_dpo.py"])
def test_sampling_scripts_have_the_whole_skeleton(script):
    missing = sorted(set(SAMPLING) - set(definitions(script)))
    assert not missing, f"{script} lacks {missing}"


def test_a_one_character_drift_is_caught(tmp_path):
    source = open(os.path.join(ROOT, "rloo.py")).read()
    assert source.count("if b <= 0 or a % b != 0:") == 1
    (tmp_path / "drifted.py").write_text(source.replace("if b <= 0 or a % b != 0:", "if b < 0 or a % b != 0:"))
    assert differences(str(tmp_path / "drifted.py")) == ["exact_div"]


def reads(path: str) -> dict[str, set[str]]:
    """Top-level statement (a helper's name, or its line) -> the names it reads."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    loaded = lambda n: {x.id for x in ast.walk(n) if isinstance(x, ast.Name) and isinstance(x.ctx, ast.Load)}  # noqa: E731
    return {getattr(n, "name", n.lineno): loaded(n) for n in tree.body}


def below_banner(path: str) -> list[str]:
    """The helpers defined below the banner line, in order."""
    lines = open(os.path.join(ROOT, path)).read().splitlines()
    banner = [i for i, line in enumerate(lines) if line.startswith("#") and "same in every script" in line]
    assert len(banner) == 1, f"{path} needs exactly one banner line"
    tree = ast.parse("\n".join(lines[banner[0] :]))
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("script", SIBLINGS)
def test_the_appendix_is_the_helpers_it_calls_in_rebels_order(script):
    anchor, carried, used = below_banner("rebel.py"), below_banner(script), reads(script)
    assert carried == [n for n in anchor if n in carried], f"{script}: not rebel.py's helpers in rebel.py's order"
    called = {n for name, names in used.items() for n in names - {name}}  # read by something other than itself
    missing = sorted(called & set(anchor) - set(used))
    assert not missing, f"{script} calls {missing} but lacks them: run python tools/sync_appendix.py"
    unused = sorted(set(carried) - called)
    assert not unused, f"{script} carries {unused} but calls none of them: run python tools/sync_appendix.py"


def test_the_sync_tool_finds_nothing_to_copy():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "sync_appendix.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_script_imports_another():
    scripts = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    for script in scripts:
        tree = ast.parse(open(os.path.join(ROOT, f"{script}.py")).read())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & set(scripts), f"{script}.py imports {imported & set(scripts)}"


def test_every_flag_has_its_own_help():
    """A field without a docstring gets the comment above it as its --help (tyro): every field needs one."""
    for script in ["rebel.py", "ppo.py", "rloo.py", "dpo.py", "iterative_dpo.py", "sft.py", "reward.py"]:
        lines = open(os.path.join(ROOT, script)).read().splitlines()
        node = next(n for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.ClassDef) and n.name == "Args")
        body = node.body
        for i, field in enumerate(body):
            if isinstance(field, ast.AnnAssign):
                follows = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(follows, ast.Expr) and isinstance(getattr(follows, "value", None), ast.Constant)
                assert documented, f"{script}: Args.{field.target.id} has no docstring"
