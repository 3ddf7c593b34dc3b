"""The training core never imports evaluation: no module outside jaxtele/eval/ imports `jaxtele.eval`, at the top
or inside a function. Read from the sources with `ast`, so nothing is imported to check it."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxtele"


def module_name(path: pathlib.Path) -> str:
  """'jaxtele.convert.certify'; a package's own module keeps its '__init__' (relative imports start there)."""
  return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imported(source: str, module: str) -> set[str]:
  """Every module a source imports (relative imports resolved against `module`), plus the string argument of
  `importlib.import_module("...")` calls."""
  package = module.split(".")[:-1]
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
          if node.level else node.module
      out.add(base)
      out |= {f"{base}.{a.name}" for a in node.names}  # `from jaxtele import eval` imports jaxtele.eval
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
      out.add(node.args[0].value)
  return out


def eval_imports(source: str, module: str) -> list[str]:
  return sorted(m for m in imported(source, module) if m == "jaxtele.eval" or m.startswith("jaxtele.eval."))


def is_core(module: str) -> bool:
  return not module.startswith("jaxtele.eval.")


def test_no_core_module_imports_eval():
  modules = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
  core = {m: s for m, s in modules.items() if is_core(m)}
  assert len(core) > 40 and "jaxtele.train" in core and "jaxtele.convert.certify" in core
  offenders = {m: eval_imports(s, m) for m, s in core.items() if eval_imports(s, m)}
  assert offenders == {}


def test_eval_builds_on_the_core():
  # The other direction holds, and the checker sees it: evaluation imports the core's loop and decoder.
  runner = (PACKAGE / "eval" / "runner.py").read_text()
  assert {"jaxtele.evaluate", "jaxtele.generation", "jaxtele.eval.documents"} <= imported(runner, "jaxtele.eval.runner")
  assert eval_imports(runner, "jaxtele.eval.runner")


def test_planted_eval_imports_are_caught():
  planted = {
      "from jaxtele.eval.perplexity import evaluate": "jaxtele.eval.perplexity",
      "import jaxtele.eval.generate as g": "jaxtele.eval.generate",
      "from jaxtele import build, eval": "jaxtele.eval",
      "def f():\n  from jaxtele.eval import diagnose\n  return diagnose": "jaxtele.eval.diagnose",
      "import importlib\nm = importlib.import_module('jaxtele.eval.runner')": "jaxtele.eval.runner",
  }
  for source, want in planted.items():
    assert want in eval_imports(source, "jaxtele.train"), source
  # Relative imports resolve against the importing module: `..eval` from the convert package is jaxtele.eval.
  assert "jaxtele.eval.generate" in eval_imports("from ..eval.generate import greedy", "jaxtele.convert.certify")
  assert "jaxtele.eval" in eval_imports("from .. import eval", "jaxtele.convert.__init__")
  # Names that only look alike are not evaluation.
  assert eval_imports("from jaxtele.evaluate import evaluate\nimport jaxtele.eval_tools", "jaxtele.train") == []
