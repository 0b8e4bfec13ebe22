"""`RecipeConfig`: the resolved recipe, one typed section per concern, and its plain-data form for the workers."""

import dataclasses
from dataclasses import dataclass
from typing import Any

from rayft.recipe.schema import (
    SECTIONS,
    DataArguments,
    FinetuningArguments,
    GeneratingArguments,
    ModelArguments,
    RayArguments,
    ServingArguments,
    TrainingArguments,
    default_of,
    field_names,
)
from rayft.recipe.values import mask


@dataclass
class RecipeConfig:
    """The resolved recipe: one instance of each argument section."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    ray: RayArguments
    serving: ServingArguments
    training: dict  # the recipe's keyword arguments of TrainingArguments; built for real inside each worker
    notes: list[str] = dataclasses.field(default_factory=list)  # what was derived, for the run log

    @property
    def args(self) -> "TrainingView":
        """The training keys with Hugging Face's defaults filled in, read as attributes (`cfg.args.seed`)."""
        return TrainingView(self.training)

    def changed_keys(self) -> dict:
        """The keys whose value differs from the schema's default (secrets masked), in section order."""
        changed = {}
        for name, cls in SECTIONS.items():
            values = self.training if name == "training" else dataclasses.asdict(getattr(self, name))
            for f in dataclasses.fields(cls):
                if f.init and f.name in values and values[f.name] != default_of(cls, f.name):
                    changed[f.name] = values[f.name]
        return mask(changed)

    def to_dict(self, mask_secrets: bool = True) -> dict:
        """The flat key -> value form a recipe is written in (secrets masked unless told otherwise)."""
        flat: dict[str, Any] = {}
        for name in (name for name in SECTIONS if name != "training"):
            section = getattr(self, name)
            flat.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section)})
        flat.update(self.training)
        return mask(flat) if mask_secrets else flat

    @classmethod
    def from_dict(cls, flat: dict) -> "RecipeConfig":
        """Rebuilds a config from `to_dict(mask_secrets=False)` (on the worker side of the boundary)."""
        sections = {}
        for name, section_cls in SECTIONS.items():
            if name == "training":
                continue
            fields = dataclasses.fields(section_cls)
            sections[name] = section_cls(**{f.name: flat[f.name] for f in fields if f.init and f.name in flat})
            for derived in (f for f in fields if not f.init):
                setattr(sections[name], derived.name, flat[derived.name])
        training_names = field_names(TrainingArguments)
        return cls(**sections, training={k: v for k, v in flat.items() if k in training_names})


class TrainingView:
    """A read-only view of the training keys: the recipe's value, or Hugging Face's default for the key."""

    __slots__ = ("_values",)

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", values)

    def __getattr__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        if key not in _TRAINING_FIELDS:
            raise AttributeError(f"{key!r} is not a training key")
        return default_of(TrainingArguments, key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("the training keys are read-only; derived values are set in recipe.derive.resolve")


_TRAINING_FIELDS = field_names(TrainingArguments)
