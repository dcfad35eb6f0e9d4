"""eval/'s import graph: the task modules take shared things from common.py, never from one another, and no
module imports another's private names (table1.py composes the tasks' public functions)."""

import ast
from pathlib import Path

import paraclip_plugin.eval as eval_package

EVAL = Path(eval_package.__file__).parent
TASKS = {"paraphrased_retrieval", "aro", "sts", "benchmark"}


def eval_imports(module):
    """(imported eval module, names) for each ``from .x import ...`` / ``from paraclip_plugin.eval.x import ...``."""
    tree = ast.parse((EVAL / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 1:
                yield node.module, [a.name for a in node.names]
            elif node.module.startswith("paraclip_plugin.eval."):
                yield node.module.rsplit(".", 1)[1], [a.name for a in node.names]


def test_task_modules_import_shared_things_from_common_only():
    for task in TASKS:
        imported = {module for module, _ in eval_imports(task)}
        assert imported <= {"common", "metrics"}, (task, imported)


def test_no_eval_module_imports_a_private_name():
    for path in EVAL.glob("*.py"):
        for module, names in eval_imports(path.stem):
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]  # a module's __doc__ is public
            assert not private, (path.name, module, names)


def test_cli_and_table1_take_the_shared_names_from_common():
    shared = {"InputError", "PROG", "load_model", "load_json", "default_device", "precision", "warn"}
    for module in ("cli", "table1"):
        for source, names in eval_imports(module):
            if source != "common":
                assert not shared & set(names), (module, source, names)
