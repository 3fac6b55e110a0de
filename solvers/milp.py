"""One way to run a PuLP MILP for every memopt solver: CBC (bundled with PuLP) or HiGHS when installed."""

from __future__ import annotations

import importlib.util

import pulp

SOLVERS = ("cbc", "highs")


def check_highs() -> None:
    if importlib.util.find_spec("highspy") is None:
        raise ValueError("solver='highs' needs the highspy package (pip install highspy, or memopt[highs]); "
                         "use solver='cbc', which ships with PuLP")


def make_solver(solver: str, time_limit_s: float, options: list[str]):
    if solver == "highs":
        check_highs()
        return pulp.HiGHS(msg=False, timeLimit=time_limit_s)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, warmStart=True, options=options)


def run_milp(prob: pulp.LpProblem, solver: str, time_limit_s: float) -> str:
    """Solve `prob` warm-started from its variables' initial values. CBC runs with its preprocessing off:
    CBC 2.10's preprocessing calls some feasible models (warm start included) infeasible, ignoring the
    time limit while it does. Returns "optimal", "time_limit", "no solution" or "solver error: ..."."""
    try:
        prob.solve(make_solver(solver, time_limit_s, ["preprocess off"]))
    except pulp.PulpSolverError as err:
        return f"solver error: {err}"
    if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "time_limit"
    return "time_limit" if prob.sol_status == pulp.LpSolutionNoSolutionFound else "no solution"
