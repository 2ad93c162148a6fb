"""The typed training configuration, in sections: YAML files + command-line flags over pydantic defaults.

- :mod:`.sections`: ``TrainConfig`` = ``run``, ``data``, ``model``, ``objective``, ``memory``, ``optim``,
  ``eval``, ``log``; named components are :class:`ComponentSpec` ``(name, args)``;
- :mod:`.loading`: ``make_config`` (from sections and/or flag-named keys), ``load_yaml`` / ``dump_yaml``,
  ``parse_yaml`` (YAML with YAML 1.2 numbers: ``1e-4`` is a float, :class:`Yaml12Loader`);
- :mod:`.flags`: one command-line flag per field (``--embedding-size``), ``config_from_args``; a malformed
  list or mapping flag is a :class:`FlagValueError` quoting the text.

Unknown keys, flags and names are errors that name the key and suggest the closest valid one; values and
names are validated before any data is loaded.
"""

from dmlkit.config.flags import (
    FlagValueError,
    add_config_arguments,
    config_from_args,
    flag_names,
    parse_list,
    parse_mapping,
)
from dmlkit.config.loading import (
    FlagKey,
    Yaml12Loader,
    config_from_checkpoint,
    dump_yaml,
    flag_keys,
    load_yaml,
    make_config,
    parse_yaml,
    validate_names,
)
from dmlkit.config.sections import (
    SECTIONS,
    ComponentSpec,
    DataSection,
    EvalSection,
    LogSection,
    MemorySection,
    ModelSection,
    ObjectiveSection,
    OptimSection,
    RunSection,
    Section,
    TrainConfig,
)

__all__ = [
    "SECTIONS",
    "ComponentSpec",
    "DataSection",
    "EvalSection",
    "FlagKey",
    "FlagValueError",
    "LogSection",
    "MemorySection",
    "ModelSection",
    "ObjectiveSection",
    "OptimSection",
    "RunSection",
    "Section",
    "TrainConfig",
    "Yaml12Loader",
    "add_config_arguments",
    "config_from_args",
    "config_from_checkpoint",
    "dump_yaml",
    "flag_keys",
    "flag_names",
    "load_yaml",
    "make_config",
    "parse_list",
    "parse_mapping",
    "parse_yaml",
    "validate_names",
]
