"""`kcompile graft`: filter grafting of N networks over torch.distributed (one rank each)."""

from __future__ import annotations


import click



@click.command()
@click.option("--arch", required=True, help="Architecture: zoo:NAME, torchvision:NAME, pkg.mod:callable, file.py:callable.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")
@click.option("--data", required=True, help="Training data: digits, a .npz with x and y, or an image-folder tree.")
@click.option("--num", type=int, default=None,
              help="Number of networks (= ranks; default 2, or torchrun's world size under torchrun).")
@click.option("--epochs", type=int, required=True, help="Training epochs (grafting after every epoch but the last).")
@click.option("-o", "--output", required=True, help="Output folder: net{i}.pth, net{i}.ckpt, graft.json.")
@click.option("--a", "a", type=float, default=0.4, show_default=True, help="Coefficient range: w in 0.5 +- a/2.")
@click.option("--c", "c", type=float, default=500.0, show_default=True, help="Entropy-difference gain.")
@click.option("--dlr", is_flag=True, help="Different initial lr per network: lr*(1+cos(pi*(N-i)/N))/2.")
@click.option("--cos", is_flag=True, help="Cosine annealing of the lr over all steps.")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoints in the output folder.")
@click.option("--no-graft", is_flag=True, help="Train the N networks independently (baseline).")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds a rank waits for the others before failing.")
@click.option("--invalid-threshold", type=float, default=0.1, show_default=True,
              help="L1 threshold of the invalid-filter count in the summary.")
def graft(arch, arch_kwargs, data, num, epochs, output, a, c, dlr, cos, lr, momentum, weight_decay, batch_size,
          seed, resume, no_graft, timeout, invalid_threshold):
    """Train --num networks at once with filter grafting (ring, entropy-weighted, once per epoch).

    Run directly it spawns --num local processes; under `torchrun --nproc-per-node N` (or
    torchrun across machines) each torchrun rank trains one network and --num defaults to
    the world size (leave it out: torchrun's own parser takes `--num` for `--numa-binding`).
    """
    from .graft import GraftConfig, run_graft

    from .cli import parse_arch_kwargs

    kwargs = parse_arch_kwargs(arch_kwargs) or {}
    if num is None:
        from .distributed import env_world

        env = env_world()
        num = env.world_size if env is not None else 2
    cfg = GraftConfig(arch=arch, out=output, data=data, num=num, epochs=epochs, a=a, c=c, dlr=dlr, cos=cos, lr=lr,
                      momentum=momentum, weight_decay=weight_decay, batch_size=batch_size, seed=seed,
                      graft=not no_graft, resume=resume, timeout=timeout, threshold=invalid_threshold,
                      arch_kwargs=kwargs)
    summary = run_graft(cfg)
    if summary is None:  # a torchrun rank other than 0
        return
    for n in summary["networks"]:
        click.echo(f"net{n['rank']}: accuracy {n['accuracy']:.2f} %, lr {n['lr']:.4g}, invalid filters "
                   f"{n['invalid_filters']}/{n['filters']} (L1 < {invalid_threshold}) -> {n['model']}")
    click.echo(f"wrote {output}/graft.json ({summary['seconds']} s)")


COMMANDS = [graft]
