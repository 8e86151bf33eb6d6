"""The delta downlink: send sites the change since the weights they hold, not the weights.

With ``comm.down.delta`` the coordinator keeps a copy of the weights the sites hold (exactly
as they decoded them). Each round it encodes ``global - copy`` with the downlink codec,
applies the decoded change to its copy as the sites will to theirs, and sends the encoded
change to every site that took part in the last round; a site that did not gets the copy
whole, in fp32. What the codec drops is not lost: it is still in ``global - copy`` and goes
out with the next round's change (error feedback on the downlink). Sites train from the
copy; the outer step moves the global weights.

Memory: the copy (one model, float32) and the encoded change (what goes out), and one
tensor of change at a time while it is made; the copy sent whole is the copy itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from atoll.federation.codecs import CodecConfig, Decoded, encode


class Downlink:
    """The sites' copy of the weights, and the change that brings it up to date."""

    def __init__(self, codec: CodecConfig) -> None:
        self.codec = codec
        self.held: dict[str, torch.Tensor] | None = None
        self.held_round = 0  # the round whose plans carried the copy as it is now
        self._change: dict[str, torch.Tensor] | None = None
        self._whole: dict[str, torch.Tensor] | None = None

    def advance(self, weights: dict[str, torch.Tensor], r: int, seed: int = 0
                ) -> dict[str, torch.Tensor] | None:
        """Bring the copy to round ``r``'s plans; the encoded change from round ``r - 1``'s
        copy, or None when there is no earlier copy (everyone gets it whole). ``seed``:
        round ``r - 1``'s, whose random places (if any) the change keeps."""
        if self.held is not None and self.held_round == r:  # this round was opened already
            return self._change
        self._change = None
        if self.held is not None and self.held_round == r - 1:
            # tensor by tensor: the change of one tensor is made, encoded into the payload
            # and dropped; then each decoded change is applied to the copy
            shapes = {n: w.shape for n, w in weights.items()}
            self._change = encode(_Change(weights, self.held), self.codec, seed, shapes=shapes)
            decoded = Decoded(self._change, shapes, self.codec, seed)
            for n in shapes:
                self.held[n] += decoded[n]
        else:
            self.held = {n: w.detach().clone() for n, w in weights.items()}
        self.held_round = r
        self._whole = None
        return self._change

    def whole(self) -> dict[str, torch.Tensor]:
        """The copy, whole (fp32), for a site that does not hold the last one."""
        if self._whole is None:
            self._whole = encode(self.held, CodecConfig())
        return self._whole

    def state_dict(self) -> dict:
        """The sites' copy and its round, for the coordinator's checkpoint (empty before the
        first round)."""
        if self.held is None:
            return {}
        return {"held": dict(self.held), "held_round": self.held_round}

    def load_state_dict(self, state: dict) -> None:
        """Restore the copy saved by :meth:`state_dict`."""
        if "held" in state:
            self.held = {n: t.clone() for n, t in state["held"].items()}
            self.held_round = int(state["held_round"])


class _Change(Mapping[str, torch.Tensor]):
    """``weights - held``, one tensor at a time: each made when read, never all at once."""

    def __init__(self, weights: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> None:
        self.weights, self.held = weights, held

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.weights[name] - self.held[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)
