"""One Python process, several trainings: accelerate keeps its state in process-wide singletons that refuse a second
configuration (another mixed precision, cpu flag), so each single-process run starts from a fresh state."""
from __future__ import annotations


def fresh_accelerate_state() -> None:
    """Reset accelerate's singletons in a single-process run (a notebook, a test session, the ablation); distributed
    processes keep theirs (the process group lives in it)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
