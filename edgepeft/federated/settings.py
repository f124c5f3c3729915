"""`FedSettings`: one validated, flat description of a federated run, carried in Flower's run config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from edgepeft.errors import InputError

PRIVACY_MODES = ("none", "central", "local")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")  # Flower's FedAvg, FedAvgM, FedAdam (flwr.serverapp.strategy)


@dataclass(frozen=True)
class FedSettings:
    """What the server and every client of one run agree on. Every field is a str, int, float or bool, so the
    whole record travels as Flower's run config (`to_run_config` / `from_run_config`).

    Each client holds partition `partition-id` of `train_data`: a Dirichlet(`alpha`) split over the labels
    into `num_partitions` parts (seeded by `partition_seed`, so every process computes the same split).
    `privacy`: "none"; "central" (clients clip their update to `clip`, the server adds Gaussian noise of
    `noise_multiplier * clip` and reports (epsilon, `delta`) from Flower's RDP accountant); "local" (each
    client clips and noises its own upload, Flower's LocalDpMod with `local_epsilon`, `delta`).
    `server_optimizer`: how the server applies the round's mean update (the pseudo-gradient): "fedavg" takes
    the mean; "fedavgm" steps by `server_lr` with heavy-ball momentum `server_momentum` (Hsu et al. 2019);
    "fedadam" takes an Adam step of size `server_lr` with adaptivity `server_tau` (Reddi et al. 2021; Flower's
    betas 0.9, 0.99). Central DP and SecAgg+ run FedAvg only (Flower's RDP accounting needs FedAvg's own
    aggregation; the SecAgg+ path uses the legacy FedAvg).
    """

    bundle: str
    train_data: str
    num_partitions: int
    test_data: str = ""  # the server's held-out data for the global adapter's accuracy ("" none)
    rounds: int = 3
    fraction_train: float = 1.0
    min_clients: int = 0  # a round starts with this many connected clients (0: all `clients_per_round`)
    round_timeout: float = 3600.0  # seconds a round waits for replies; a client that drops out is left out
    alpha: float = 0.3
    partition_seed: int = 0
    local_epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-3
    max_steps: int = 0  # per client and round; 0: no limit beyond `local_epochs`
    seed: int = 0
    privacy: str = "none"
    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    local_epsilon: float = 10.0
    secagg: bool = False
    server_optimizer: str = "fedavg"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_tau: float = 1e-3
    out_dir: str = ""  # the final adapter (PEFT format) and report.json are written here ("" nowhere)
    threads: int = 1  # ORT intra-op threads per client
    record_dir: str = ""  # tests: clients write their true updates, the server what it received, here

    def __post_init__(self) -> None:
        if self.num_partitions < 1:
            raise InputError(f"`num_partitions` must be at least 1, got {self.num_partitions}")
        if self.rounds < 1:
            raise InputError(f"`rounds` must be at least 1, got {self.rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise InputError(f"`fraction_train` must be in (0, 1], got {self.fraction_train}")
        if self.min_clients < 0 or self.round_timeout <= 0:
            raise InputError("`min_clients` must be >= 0 and `round_timeout` positive")
        if self.alpha <= 0:
            raise InputError(f"`alpha` must be positive, got {self.alpha}")
        if self.local_epochs < 1 or self.batch_size < 1 or self.max_steps < 0:
            raise InputError("`local_epochs` and `batch_size` must be at least 1, `max_steps` at least 0")
        if self.privacy not in PRIVACY_MODES:
            raise InputError(f"`privacy` must be one of {PRIVACY_MODES}, got {self.privacy!r}")
        if self.clip <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1 or self.local_epsilon <= 0:
            raise InputError("`clip` and `local_epsilon` must be positive, `noise_multiplier` >= 0, `delta` in (0, 1)")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise InputError(f"`server_optimizer` must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
        if self.server_lr <= 0 or not 0 <= self.server_momentum < 1 or self.server_tau <= 0:
            raise InputError("`server_lr` and `server_tau` must be positive, `server_momentum` in [0, 1)")
        if self.server_optimizer != "fedavg" and (self.privacy == "central" or self.secagg):
            raise InputError(f"central DP and SecAgg+ run with `server_optimizer` 'fedavg', not "
                             f"{self.server_optimizer!r}")  # fmt: skip
        if self.privacy == "central" and self.noise_multiplier <= 0:
            raise InputError("central DP needs a positive `noise_multiplier` (its epsilon is reported)")

    @property
    def clients_per_round(self) -> int:
        return max(1, round(self.num_partitions * self.fraction_train))

    @property
    def round_minimum(self) -> int:
        """How many clients a round needs before it starts (and the fewest it is sampled from)."""
        return self.min_clients or self.clients_per_round

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        return {f"edgepeft-{key.replace('_', '-')}": value for key, value in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict) -> FedSettings:
        """Read the fields back (keys `edgepeft-<field>`); other keys are ignored."""
        values = {}
        for f in fields(cls):
            key = f"edgepeft-{f.name.replace('_', '-')}"
            if key in config:
                values[f.name] = config[key]
        missing = {"bundle", "train_data", "num_partitions"} - set(values)
        if missing:
            raise InputError(f"the run config lacks {sorted(missing)} (keys edgepeft-<field>)")
        kinds = {f.name: type(getattr(cls(bundle="", train_data="", num_partitions=1), f.name)) for f in fields(cls)}
        return cls(**{name: kinds[name](value) for name, value in values.items()})
