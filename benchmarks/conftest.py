"""pytest-benchmark suite of the op micro-benchmarks: ``pytest benchmarks/ --benchmark-only``.

Kept out of the normal test run (``testpaths = ["tests"]``; CI runs ``pytest tests``). Without
pytest-benchmark every test here is skipped, saying so; ``pip install -r requirements-bench.txt`` adds it.
"""
import pytest

MISSING = "pytest-benchmark is not installed: pip install -r requirements-bench.txt"


def _have_plugin(pluginmanager):
    return pluginmanager.hasplugin("benchmark")  # false when not installed, or disabled with -p no:benchmark


def pytest_addoption(parser, pluginmanager):
    group = parser.getgroup("medkernels benchmarks")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-stages", default="1,4", help="MedMamba-T stages whose shapes to time (1-4)")
    group.addoption("--bench-rounds", type=int, default=5, help="timed rounds per benchmark")
    group.addoption("--bench-compile", action="store_true",
                    help="the cases of --full: torch.compile of the references on CPU (minutes of compiling), "
                    "every depthwise layout")
    if not _have_plugin(pluginmanager):
        # so that the documented command line still parses and the skip reason is what the user sees
        parser.addoption("--benchmark-only", action="store_true", help=MISSING)


def pytest_report_header(config):
    return None if _have_plugin(config.pluginmanager) else f"medkernels benchmarks: {MISSING}; every benchmark is skipped"


def pytest_collection_modifyitems(config, items):
    if not _have_plugin(config.pluginmanager):
        for item in items:
            item.add_marker(pytest.mark.skip(reason=MISSING))


def pytest_terminal_summary(terminalreporter, config):
    if not _have_plugin(config.pluginmanager):
        terminalreporter.write_line(f"medkernels benchmarks: {MISSING}", yellow=True)
