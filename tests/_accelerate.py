"""accelerate keeps process-wide state (mixed precision, device): in-process training runs reset it.

Import `fresh_accelerate_state` into a test module to make it autouse there."""

import pytest
import torch


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run starts clean, on one thread (tiny tensors: one thread beats two on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()
