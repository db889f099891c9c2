"""How much of the project's CUDA-only code the CPU suite runs: branch coverage (coverage.py) of the CUDA-only
lines of train.py, prepare.py and machine.py over `pytest`, and each line the CPU never reaches.

    uv run python tools/cuda_lines.py            # runs the suite under coverage (about 3 minutes on 2 cores)
    uv run python tools/cuda_lines.py --no-run   # reads the last run's .coverage

A CUDA-only line (read from the source, not from the run):
- a statement in the branch of an `if` that runs only on CUDA: `device.type == "cuda"`, `torch.cuda.is_available()`,
  a name assigned from either (COMPILE, pin), alone or in an `and`; the `else` of their negation, and what follows
  an `if not ...: return` in the same block;
- a call of a torch.cuda function (is_available aside), wherever it stands;
- a conditional expression with such a test (`a if device.type == "cuda" else b`): coverage measures the line,
  not which side ran, so these are listed apart;
- every line of a function that is called only from CUDA-only lines.
"""

import argparse
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["train.py", "prepare.py", "machine.py"]


def is_cuda_test(node, names):
    """Whether an expression is true only on CUDA: a comparison with "cuda", torch.cuda.is_available(), a name
    assigned from one, or an `and` holding one."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return any(is_cuda_test(value, names) for value in node.values)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
        return any(isinstance(side, ast.Constant) and side.value == "cuda" for side in (node.left, *node.comparators))
    if isinstance(node, ast.Call):
        return ast.unparse(node.func) == "torch.cuda.is_available"
    return isinstance(node, ast.Name) and node.id in names


def is_not_cuda_test(node, names):
    """The negation: `not <cuda test>` or `device.type != "cuda"`."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return is_cuda_test(node.operand, names)
    return (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.NotEq)
            and any(isinstance(s, ast.Constant) and s.value == "cuda" for s in (node.left, *node.comparators)))


def span(statements):
    return {line for s in statements for line in range(s.lineno, s.end_lineno + 1)}


def ends_block(statement):
    last = statement.body[-1]
    return isinstance(last, (ast.Return, ast.Raise)) or (
        isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) and ast.unparse(last.value.func) == "sys.exit")


def cuda_lines(source):
    """({line: why} of the CUDA-only lines of a module, {line: why} of its conditional expressions on CUDA)."""
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):  # names that hold a CUDA test: COMPILE, pin
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if is_cuda_test(node.value, names):
                names.add(node.targets[0].id)
    lines, conditional = {}, {}

    def mark(new, why):
        for line in new:
            lines.setdefault(line, why)

    for node in ast.walk(tree):
        for field in ("body", "orelse"):  # blocks of statements
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for i, statement in enumerate(block):
                if not isinstance(statement, ast.If):
                    continue
                if is_cuda_test(statement.test, names):
                    mark(span(statement.body), f"if {ast.unparse(statement.test)}")
                elif is_not_cuda_test(statement.test, names):
                    mark(span(statement.orelse), f"else of if {ast.unparse(statement.test)}")
                    if ends_block(statement):
                        mark(span(block[i + 1:]), f"after if {ast.unparse(statement.test)}: return")
        if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch.cuda.") and \
                ast.unparse(node.func) != "torch.cuda.is_available":
            mark(range(node.lineno, node.end_lineno + 1), f"calls {ast.unparse(node.func)}")
        if isinstance(node, ast.IfExp) and is_cuda_test(node.test, names):
            conditional.setdefault(node.lineno, f"... if {ast.unparse(node.test)} else ...")
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    changed = True
    while changed:  # functions called only from CUDA-only lines are CUDA-only
        changed = False
        for name, function in functions.items():
            calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                     and n.func.id == name]
            body = span(function.body)
            if calls and all(c.lineno in lines for c in calls) and not body <= set(lines):
                mark(body, f"{name}() is called only from CUDA-only lines")
                changed = True
    return lines, conditional


def main(argv=None):
    parser = argparse.ArgumentParser(description="Branch coverage of the CUDA-only lines over the CPU suite.")
    parser.add_argument("--no-run", action="store_true", help="read the last run's .coverage instead of running")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if not args.no_run:
        subprocess.run([sys.executable, "-m", "coverage", "erase"], check=True)
        suite = subprocess.run([sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        print(f"pytest exited with {suite.returncode}")
        subprocess.run([sys.executable, "-m", "coverage", "combine", "-q"], check=True)
    import coverage
    cov = coverage.Coverage(data_suffix=False)  # the combined .coverage, not a new parallel file
    cov.load()
    data = cov.get_data()
    total = reached = 0
    unreached, conditionals = [], []
    for name in FILES:
        path = os.path.join(ROOT, name)
        with open(path) as f:
            source = f.read()
        text = source.splitlines()
        executable = cov.analysis2(path)[1]  # the lines coverage can execute (statements)
        executed = set(data.lines(path) or [])
        lines, conditional = cuda_lines(source)
        statements = sorted(line for line in lines if line in executable)
        total += len(statements)
        reached += sum(line in executed for line in statements)
        unreached += [(name, line, lines[line], text[line - 1].strip()) for line in statements if line not in executed]
        conditionals += [(name, line, why, line in executed) for line, why in sorted(conditional.items())]
    print(f"CUDA-only lines: {total}; reached by the CPU suite: {reached}; unreached: {total - reached}")
    for name, line, why, code in unreached:
        print(f"  {name}:{line}  {code[:90]}  [{why}]")
    print(f"Conditional expressions with a CUDA side (the line is measured, not the side): {len(conditionals)}")
    for name, line, why, ran in conditionals:
        print(f"  {name}:{line}  {why}  (line {'reached' if ran else 'unreached'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
