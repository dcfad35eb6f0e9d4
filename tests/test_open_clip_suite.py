"""tests/open_clip_suite.py (open_clip's own tests in `make test`): its list of left-out tests and its hook check."""

import pytest

import open_clip_suite
from open_clip_suite import HookCheck, read_deselected


def test_every_left_out_test_has_a_reason_and_slow_ones_can_be_included(tmp_path):
    entries = read_deselected()
    assert entries and all(reason.startswith(open_clip_suite.REASON_TAGS) for _, reason in entries)
    slow = [node for node, reason in entries if reason.startswith("[time]")]
    assert slow and not {node for node, _ in read_deselected(include_slow=True)} & set(slow)
    bad = tmp_path / "list.txt"
    bad.write_text("tests/test_x.py::test_y\n")
    with pytest.raises(SystemExit, match="list.txt:1: 'tests/test_x.py::test_y' needs a reason"):
        read_deselected(bad)


def test_hook_check_flags_a_hook_that_is_not_a_no_op():
    check = HookCheck([])
    model = object()
    assert check.counting("wrap_model", lambda m, args: m)(model, None) is model
    assert check.counting("configure", lambda args: None)(None) is None
    assert check.problems() == []
    check.counting("wds_decode_stages", lambda *a: ["a stage"])(None, None, None, True)
    assert check.problems() == ["wds_decode_stages returned list without ParaCLIP flags"]


def test_hook_check_flags_hooks_never_reached_and_stale_list_entries():
    check = HookCheck([("tests/test_wds.py::test_gone", "[time] x")])
    check.ran_files.add("test_wds.py")
    check.counting("add_arguments", lambda parser: None)(None)
    problems = check.problems()
    assert any("lists tests/test_wds.py::test_gone, which is not a test" in p for p in problems)
    assert any("paraclip hook wds_decode_stages was never called" in p for p in problems)
    assert not any("hook add_arguments" in p for p in problems)
