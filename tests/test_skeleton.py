"""The shared skeleton is identical in every script: a helper that exists under the same name in rebel.py and in a
sibling must have the same source, so that a fix lands everywhere and `diff rebel.py X` shows the algorithm only.
Scripts never import each other: this test is what keeps their copies in step."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIBLINGS = ["ppo.py", "rloo.py", "dpo.py", "iterative_dpo.py", "sft.py", "reward.py", "rebel_lcm.py"]
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
    shared = set(anchor) & set(other) - {"Args"}
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
