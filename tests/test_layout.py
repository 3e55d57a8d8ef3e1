"""The test suite's own rules: the fast tier's `slow` marking (tests/conftest.py) names modules and fixtures that
exist, and pytest refuses a parametrisation that came out empty instead of skipping it."""

import tomllib

import conftest
from conftest import REPO

PYTEST = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def test_every_module_marked_slow_exists():
    """A renamed module would silently join the fast tier with everything it trains."""
    assert all((REPO / "tests" / name).is_file() for name in conftest.SLOW_MODULES), conftest.SLOW_MODULES


def test_every_fixture_marked_slow_is_a_conftest_fixture():
    assert all(callable(getattr(conftest, name, None)) for name in conftest.SLOW_FIXTURES), conftest.SLOW_FIXTURES


def test_the_trainer_patterns_match_how_tests_start_it():
    starts = conftest.STARTS_TRAINER.search
    assert starts('result = run_train("--config", str(cfg))')
    assert starts('subprocess.Popen([sys.executable, "-m", "wellocr.train", "--config", str(cfg)])')
    assert starts('[sys.executable, str(REPO / "benchmarks" / "bench.py"), "--tiny"]')
    assert not starts("from wellocr.train import parse_args")
    assert not starts('subprocess.run([sys.executable, "-m", "wellocr.cost", "--run", str(run)])')


def test_slow_is_registered_and_an_empty_parametrisation_fails():
    assert any(marker.startswith("slow:") for marker in PYTEST["markers"])
    assert PYTEST["empty_parameter_set_mark"] == "fail_at_collect"
