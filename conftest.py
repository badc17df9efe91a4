"""pytest setup: where the Triton kernels run, how many examples hypothesis draws, and one
warning of Triton's interpreter that is not a fault.

TRITON_INTERPRET must be set before any @triton.jit function is imported, so it is set here,
before pytest imports the test module. The default, 1, runs the kernels in Triton's CPU
interpreter on CPU tensors. On a CUDA machine, TRITON_INTERPRET=0 compiles them instead, and
the kernel tests put their inputs on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=40, **_common)  # CI and the default run
settings.register_profile("soak", max_examples=400, **_common)  # HYPOTHESIS_PROFILE=soak
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    # The interpreter evaluates tl.sigmoid(z) as 1 / (1 + exp(-z)) in numpy: for z below -88
    # exp overflows to inf and the sigmoid is its correct limit, 0, with a RuntimeWarning.
    config.addinivalue_line("filterwarnings",
                            "ignore:overflow encountered in exp:RuntimeWarning:triton.runtime.interpreter")


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what does not run
def pytest_collection_modifyitems(config, items):
    # The Hopper shared-memory test compiles kernels for sm_90 with ptxas, minutes of one core:
    # started now, it runs beside the other tests (pytest itself keeps one core busy).
    if config.option.collectonly:
        return
    if any(item.name == "test_hopper_shared_memory_fits_the_accepted_sizes" for item in items):
        import test_equivalence

        run = test_equivalence.start_hopper_compile()
        config.add_cleanup(lambda: run.poll() is None and (run.kill(), run.wait()))  # a run cut short
