"""FaultInjector: the spec `SITE:ACTION@N` fires its fault once, on the N-th call there."""

import threading

import pytest

from jaxserve.core.faults import ENV_VAR, FaultInjector, FaultSpec, InjectedFault


def test_the_spec_fires_on_its_call_at_its_site_and_only_then():
    faults = FaultInjector.from_env({ENV_VAR: "sampler:raise@2"})
    faults.hit("forward")
    faults.hit("forward")
    faults.hit("sampler")
    with pytest.raises(InjectedFault, match="sampler call 2"):
        faults.hit("sampler")
    faults.hit("sampler")


def test_no_spec_is_no_injector():
    assert FaultInjector.from_env({}) is None


@pytest.mark.parametrize("text", ["forward", "forward:raise", "forward:explode@1",
                                  "tokenizer:raise@1", "forward:raise@0", "forward:raise@x"])
def test_a_malformed_spec_is_a_value_error_naming_the_variable(text):
    with pytest.raises(ValueError, match=ENV_VAR):
        FaultSpec.parse(text)


def test_a_hang_blocks_the_calling_thread():
    faults = FaultInjector(FaultSpec("forward", "hang", 1))
    thread = threading.Thread(target=faults.hit, args=("forward",), daemon=True)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()
