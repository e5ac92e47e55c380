"""m chosen per query: the nested tokens make a larger m cheap to try after a smaller one
(`Generator.escalate` keeps the prefix's KV cache), so a request can start small and pay for
more visual tokens only when its answer looks unsure.

- `escalate`: answer on a ladder of m, stop at the first answer whose confidence (a `SIGNALS`
  entry) clears a threshold calibrated on a validation split (`calibrate`), saved with the run
  as policy.json and reused.
- `router`: a small learned head that predicts, before answering, whether each rung's answer
  will be right from cheap features (the question's mean input embedding and the mean of the
  image's first visual tokens), trained on a training split's per-m correctness
  (`train_router`); it answers once, at the smallest rung predicted within a calibrated
  slack of the best. Saved as router.json.
- `oracle` (evaluation only): the smallest m on the ladder whose answer is right (the smallest
  rung where none is); the upper bound a policy is measured against.

Calibration, the router's training and the frontier plot are evaluation's
(mqt_jax/evaluation/policies.py); this module is what runs when answering.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mqt_jax.core import splice
from mqt_jax.inference.generate import Generated


def mean_logprob(g: Generated) -> float:
    """The answer's mean token log-probability, the EOS that ended it included."""
    lps = g.logprobs + ([g.eos_logprob] if g.eos_logprob is not None else [])
    return float(np.mean(lps)) if lps else 0.0


def first_margin(g: Generated) -> float:
    """The first token's log-probability lead over the runner-up."""
    return g.margin


SIGNALS = {"mean_logprob": mean_logprob, "margin": first_margin}


def default_ladder(num_queries: int) -> tuple[int, ...]:
    """2 -> 8 -> 32 -> M, the rungs below M that exist."""
    return tuple(m for m in (2, 8, 32) if m < num_queries) + (num_queries,)


@dataclasses.dataclass(frozen=True)
class Escalate:
    ladder: tuple[int, ...]
    signal: str = "mean_logprob"
    threshold: float = float("inf")  # inf: always climb to the top rung
    calibration: dict = dataclasses.field(default_factory=dict, compare=False)  # how it was set

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"confidence signal {self.signal!r}: expected one of {sorted(SIGNALS)}")
        if list(self.ladder) != sorted(set(self.ladder)) or not self.ladder:
            raise ValueError(f"ladder {list(self.ladder)}: m must increase along it")
        if np.isnan(self.threshold) or self.threshold == -np.inf:
            raise ValueError(f"threshold {self.threshold}: a number (inf: always climb)")
        if not isinstance(self.calibration, dict):
            raise ValueError(f"calibration {self.calibration!r}: expected an object")

    def accept(self, g: Generated) -> bool:
        return SIGNALS[self.signal](g) >= self.threshold

    def save(self, path: Path) -> None:
        from mqt_jax.core.outputs import write_atomic

        write_atomic(path, json.dumps({"policy": "escalate", **dataclasses.asdict(self),
                                       "ladder": list(self.ladder)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Escalate:
        try:
            saved = json.loads(Path(path).read_text())
            return cls(tuple(saved["ladder"]), saved["signal"], float(saved["threshold"]),
                       saved.get("calibration", {}))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}: not a saved escalation policy ({e})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """P(right at each rung) = sigmoid(standardised features @ weights + bias); a question goes
    to the smallest rung whose prediction is within `slack` of its best rung's."""

    ladder: tuple[int, ...]
    weights: np.ndarray  # [features, rungs]
    bias: np.ndarray  # [rungs]
    mean: np.ndarray  # [features]: the training features' mean and standard deviation
    scale: np.ndarray
    slack: float = 0.0
    calibration: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        f, r = self.weights.shape if self.weights.ndim == 2 else (0, 0)
        if (r != len(self.ladder) or self.bias.shape != (r,) or self.mean.shape != (f,)
                or self.scale.shape != (f,)):
            raise ValueError("the router's arrays' shapes disagree")
        for name in ("weights", "bias", "mean", "scale"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"the router's {name} are not all finite numbers")
        if not (self.scale > 0).all():
            raise ValueError("the router's scale (the features' standard deviations) must be > 0")
        if not 0 <= self.slack < np.inf:
            raise ValueError(f"slack {self.slack}: a number >= 0")
        if not isinstance(self.calibration, dict):
            raise ValueError(f"calibration {self.calibration!r}: expected an object")

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return 1 / (1 + np.exp(-(z @ self.weights + self.bias)))

    def rungs(self, features: np.ndarray, slack: float | None = None) -> np.ndarray:
        """Each question's rung index."""
        p = self.predict(features)
        close = p >= p.max(1, keepdims=True) - (self.slack if slack is None else slack)
        return close.argmax(1)

    def route(self, features: np.ndarray) -> np.ndarray:
        return np.array(self.ladder)[self.rungs(features)]

    def head_flops(self) -> float:
        return 2.0 * self.weights.size

    def check(self, model_config) -> Router:
        """This router, if it fits the model: its rungs are m the model has, and it reads
        features of the model's width (router_features: 2 x the LLM's hidden size)."""
        model_config.check_m(list(self.ladder))
        if self.weights.shape[0] != 2 * model_config.llm.hidden:
            raise ValueError(f"the router reads {self.weights.shape[0]} features; this model's "
                             f"are {2 * model_config.llm.hidden} (a router of another model?)")
        return self

    def save(self, path: Path) -> None:
        from mqt_jax.core.outputs import write_atomic

        arrays = {k: getattr(self, k).tolist() for k in ("weights", "bias", "mean", "scale")}
        write_atomic(path, json.dumps({"policy": "router", "ladder": list(self.ladder),
                                       "slack": self.slack, **arrays,
                                       "calibration": self.calibration}) + "\n")

    @classmethod
    def load(cls, path: Path) -> Router:
        try:
            saved = json.loads(Path(path).read_text())
            return cls(tuple(saved["ladder"]), *(np.array(saved[k], np.float64) for k in
                                                 ("weights", "bias", "mean", "scale")),
                       float(saved["slack"]), saved.get("calibration", {}))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}: not a saved router ({e})") from None


def router_features(embedding: np.ndarray, visual: np.ndarray, prompts: list[splice.Example],
                    first: int) -> np.ndarray:
    """[N, 2 hidden], known before any answer: the mean input embedding of each prompt's text
    after its image (the question), and the mean of the image's first `first` visual tokens
    (the vision pass every answer needs anyway)."""
    question = np.stack([embedding[[t for t in p.tokens[list(p.tokens).index(splice.IMAGE_TOKEN) + 1:]
                                    if t >= 0]].mean(0) for p in prompts])
    return np.concatenate([question, np.asarray(visual)[:, :first].mean(1)], 1).astype(np.float64)


def embedding_table(params) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(params["llm"]["embedding"], tiled=True),
                      np.float32)


