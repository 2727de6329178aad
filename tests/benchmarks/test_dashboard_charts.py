"""benchmarks/dashboard_charts.py: the dashboard's charts as a PNG from a real run's step
records, its windows tiling the run."""

import numpy as np
import pytest

from jaxserve import SamplingParams


@pytest.fixture(scope="module")
def charts(import_benchmarks):
    return import_benchmarks("dashboard_charts").dashboard_charts


@pytest.mark.slow  # matplotlib's import and six charts: seconds
def test_a_runs_records_become_one_png_of_every_chart(charts, qwen2_llm, tmp_path):
    import matplotlib.image

    engine = qwen2_llm.llm_engine
    num_before = len(engine.step_stats)
    prefix = list(range(20, 84))
    qwen2_llm.generate([{"prompt_token_ids": prefix + [150 + i]} for i in range(6)],
                       SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    records = engine.step_stats.records()[num_before:]
    path = charts.save_charts(records, str(tmp_path / "run.png"))
    image = matplotlib.image.imread(path)  # [H, W, 4]
    assert image.shape[0] > 500 and image.shape[1] > 800
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20  # not blank


def test_the_windows_count_every_step_once(charts, qwen2_llm):
    records = qwen2_llm.llm_engine.step_stats.records()
    if not records:
        qwen2_llm.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
        records = qwen2_llm.llm_engine.step_stats.records()
    windows = charts.windows(records, 0.25)
    assert sum(w["num_steps"] for w in windows) == len(records)
    assert sum(w["tokens"]["decode"] for w in windows) == sum(r.num_decode_tokens
                                                              for r in records)


def test_no_records_is_an_error(charts, tmp_path):
    with pytest.raises(ValueError, match="step record"):
        charts.save_charts((), str(tmp_path / "none.png"))
