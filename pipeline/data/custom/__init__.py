"""Your own images as a WILDS dataset (`dataset.name: custom`, options in `prepare.custom`):
`config.py` reads and checks the source (no wilds import), `dataset.py` writes the WILDS folder
and is the `WILDSDataset` over it. See `config.py` for the format."""

from pipeline.data.custom.config import CustomConfig, CustomDataError, build_table


def __getattr__(name: str):
    # the writer and the wilds class import wilds (seconds); the config alone does not
    if name in ("generate_dataset", "CustomDataset"):
        from pipeline.data.custom import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CustomConfig", "CustomDataError", "build_table", "generate_dataset", "CustomDataset"]
