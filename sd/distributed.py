"""Training in several processes: torch.distributed's data parallelism (DDP), launched by torchrun.

`torchrun --nproc-per-node N -m sd.train ...` (and torchrun's rendezvous flags for several machines) starts N
processes and gives each its RANK, LOCAL_RANK and WORLD_SIZE; `Processes.from_environment` reads them and
`join` makes the processes one group: NCCL on GPUs (one per process, by local rank), gloo on CPUs. Each
step's batch is the global one (--batch-size): every process draws the same random numbers for all of it
and takes its slice of batch / world images, DDP averages the gradients, so N processes compute the step
one process computes with the whole batch (up to float summation order), and a run resumes in any process
count that divides the batch. Only rank 0 writes (states, samples, outputs); the others wait for it where a
file must exist. Without torchrun's variables the run is one process and nothing here does anything.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sd.errors import InputError

TIMEOUT = datetime.timedelta(minutes=30)  # a rank waiting longer than this for the others gives up


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's: rank of world; `device` is the one it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Processes":
        """This process's place as torchrun's variables give it (one process without them); `join` before use."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    def join(self, device: str) -> None:
        """Join the run's process group: NCCL on GPUs (this process's by its local rank), gloo on CPUs."""
        if self.several and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend, timeout=TIMEOUT)

    @property
    def main(self) -> bool:
        """The process that writes."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def device(self, name: str) -> torch.device:
        """The device of this process: its local GPU under torchrun."""
        return torch.device("cuda", self.local_rank) if self.several and name.startswith("cuda") else torch.device(name)

    def share(self, batch_size: int) -> int:
        """Images of each step this process computes."""
        if batch_size % self.world:
            raise InputError(f"--batch-size {batch_size} cannot be split among torchrun's {self.world} processes; "
                             f"give a multiple of {self.world} (the batch is the whole step's, all processes "
                             f"together)")
        return batch_size // self.world

    def part(self, x, batch_size: int):
        """This process's slice of a whole-batch tensor or list."""
        share = self.share(batch_size)
        return x[self.rank * share:(self.rank + 1) * share]

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` in DDP when several processes train it (its frozen parameters are left out)."""
        if not self.several:
            return module
        ids = [self.local_rank] if next(module.parameters()).device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)  # SD 2.x: CLIP's last layer unread

    def mean(self, value: float) -> float:
        """The mean over the processes of a number each computed (the loss shown)."""
        if not self.several:
            return value
        t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t) / self.world

    def agree(self, error: str | None) -> None:
        """Raise on every process if any one of them met `error` (a check that must stop them all)."""
        if not self.several:
            if error:
                raise InputError(error)
            return
        errors = [None] * self.world
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise InputError(first)

    def wait(self) -> None:
        """Until every process is here."""
        if self.several:
            dist.barrier()

    def close(self) -> None:
        if self.several and dist.is_initialized():
            dist.destroy_process_group()
