"""Keep an ActivationCompressor installed over the forward passes of one training step.

A training step may run several forward/backward pairs (manual optimization), and only the
forwards may be captured: backward and checkpoint recomputation must not be. The Lightning
callbacks drive one :class:`StepCapture` from their hooks:

    start_step()   at the start of a training batch      -> installed
    pause()        before each backward                  -> removed
    resume()       after each backward of the same batch -> installed again (only when
                   ``several_forwards``: manual optimization; otherwise no forward follows)
    end_step()     at the end of the batch               -> removed
    close()        on exception, fit end and teardown    -> removed, whatever the state
"""

from __future__ import annotations

from contextlib import ExitStack

from loract_lightning.context import ActivationCompressor
from loract_lightning.stats import CompressionStats


class StepCapture:
    """Installs ``compressor.capture()`` around each forward of a step and sums their stats."""

    def __init__(self, compressor: ActivationCompressor, several_forwards: bool = True) -> None:
        self.compressor = compressor
        self.several_forwards = several_forwards
        self.step_stats = CompressionStats()
        """Stats of the current (or last finished) step, summed over its forwards."""
        self._installed: ExitStack | None = None
        self._forward_stats: CompressionStats | None = None
        self._in_step = False

    @property
    def installed(self) -> bool:
        return self._installed is not None

    def start_step(self) -> None:
        self.close()
        self.step_stats = CompressionStats()
        self._in_step = True
        self._install()

    def pause(self) -> None:
        self._remove()

    def resume(self) -> None:
        if self._in_step and self.several_forwards:
            self._install()

    def end_step(self) -> None:
        self._remove()
        self._in_step = False

    close = end_step

    def _install(self) -> None:
        if self._installed is None:
            # Marked installed only once capture() has entered: an error there must surface as
            # itself, not as a failed clean-up of a half-made state.
            installed = ExitStack()
            self._forward_stats = installed.enter_context(self.compressor.capture())
            self._installed = installed

    def _remove(self) -> None:
        if self._installed is not None:
            installed, self._installed = self._installed, None
            installed.close()
            self.step_stats.merge(self._forward_stats)
