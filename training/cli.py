"""``embedseg-train``: training and checkpoint tools (needs torch)."""

from __future__ import annotations

from pathlib import Path

import click

from .checkpoint import CheckpointError, convert_upstream


@click.group()
def main() -> None:
    """Train EmbedSeg models and convert upstream EmbedSeg checkpoints."""


def _floats(text: str | None, n: int | None = None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}") from None
    if n is not None and len(values) != n:
        raise click.BadParameter(f"expected {n} numbers, got {len(values)}")
    return values


@main.command("import-upstream")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Our checkpoint file to write.",
)
@click.option(
    "--data-properties",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Upstream data_properties.json (default: beside the checkpoint).",
)
@click.option(
    "--normalization",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Upstream normalization.json (default: beside the checkpoint; else min-max-percentile).",
)
@click.option(
    "--test-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON with upstream create_test_configs_dict values (n_*, l_*, thresholds) that override.",
)
@click.option("--grid", help="Upstream grid (n_z,)n_y,n_x in array order, e.g. '32,96,96'.")
@click.option("--pixel", help="Upstream pixel extents (l_z,)l_y,l_x in array order.")
@click.option("--anisotropy", type=float, help="z/x voxel size ratio (3D; default from data_properties).")
@click.option("--seed-thresh", type=float)
@click.option("--fg-thresh", type=float)
@click.option("--min-object-size", type=int)
def import_upstream_cmd(checkpoint, out, data_properties, normalization, test_config, grid, pixel, anisotropy,
                        seed_thresh, fg_thresh, min_object_size) -> None:  # fmt: skip
    """Convert an upstream EmbedSeg CHECKPOINT (best_iou_model.pth) into a self-describing checkpoint."""
    try:
        contract = convert_upstream(
            checkpoint,
            out,
            data_properties,
            normalization,
            test_config,
            grid=_floats(grid),
            pixel=_floats(pixel),
            anisotropy=anisotropy,
            seed_thresh=seed_thresh,
            fg_thresh=fg_thresh,
            min_object_size=min_object_size,
        )
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"wrote {out}: {contract.ndim}D, {contract.in_channels} channel(s), spacing {contract.spacing}, "
        f"normalization {contract.normalization.kind}, min_object_size {contract.thresholds.min_object_size}"
    )


if __name__ == "__main__":
    main()
