"""The next batch read ahead and copied to the accelerator while the current micro-step computes.

Without it, a GPU step ends, the host reads the next batch from the shards into pageable memory and copies it over
while the GPU idles. `Prefetcher` wraps any train loader (next_batch / state_dict / load_state_dict): each
`next_batch()` hands out the batch read on the previous call, already on the device, and then reads the next one
into pinned memory and starts its copy on a side stream, so the read and the copy overlap the compute queued
behind. The batches and their order are the wrapped loader's exactly. `state_dict()` is the wrapped loader's state
as of the batches handed out (the read-ahead batch is not counted), so a checkpoint resumes on the right batch.
On a CPU there is nothing to overlap: `prefetching` returns the loader itself.
"""

from __future__ import annotations

import copy

import torch


def prefetching(loader, device: str | torch.device):
    """`loader` wrapped in a Prefetcher for a CUDA device; the loader itself elsewhere."""
    return Prefetcher(loader, device) if torch.device(device).type == "cuda" else loader


class Prefetcher:
    def __init__(self, loader, device: str | torch.device):
        self.loader, self.device = loader, torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._ahead = None  # (loader state before the batch was read, x, y) on the device, copy maybe in flight

    def __getattr__(self, name):  # epoch, manifest, tokens_per_epoch, ... of the wrapped loader
        return getattr(self.loader, name)

    def _read(self):
        state = copy.deepcopy(self.loader.state_dict())
        x, y = self.loader.next_batch()
        if not self._cuda:
            return state, x.to(self.device), y.to(self.device)
        x, y = x.pin_memory(), y.pin_memory()
        with torch.cuda.stream(self._stream):
            return state, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_batch(self):
        _, x, y = self._ahead or self._read()
        if self._cuda:  # the compute stream waits for the copy; the tensors belong to it from now on
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._stream)
            x.record_stream(current)
            y.record_stream(current)
        self._ahead = self._read()
        return x, y

    def state_dict(self) -> dict:
        return copy.deepcopy(self._ahead[0]) if self._ahead else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)
