"""A tiny scored and evaluated run with its report, shared by the report tests."""

from __future__ import annotations

import pytest

from tests.conftest import copy_run


@pytest.fixture(scope="session")
def reported(tiny_scored, tmp_path_factory) -> dict:
    from pipeline.evaluation.config import EvaluateConfig
    from pipeline.evaluation.retrain import run_evaluation
    from pipeline.report.build import build_report

    run = copy_run(tiny_scored["run"], tmp_path_factory.mktemp("reported") / "run")
    run_evaluation(
        EvaluateConfig(run=run, keeps=[0.5], methods=["diffin", "random"], steps=4, threads=1)
    )
    return {"run": run, "html": build_report(run, top=6)}
