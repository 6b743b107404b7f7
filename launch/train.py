"""Train a vision transformer: parse -> Config -> Trainer -> fit.

    python launch/train.py --config configs/demo_digits.yaml            # one process
    torchrun --nproc-per-node 8 launch/train.py --config configs/vit_base_imagenet.yaml
    distvit torchrun --nproc-per-node 8 launch/train.py ...   # the same; a failed rank ends it in one line
    deepspeed --num_gpus 8 launch/train.py --config ...   # SIGTERM to it alone orphans the ranks: kill its group
    accelerate launch --num_processes 8 launch/train.py --config ...
    mpirun -np 8 python launch/train.py --config ...
    sbatch slurm/train.sbatch configs/vit_base_imagenet.yaml
    # on CPU-only machines: DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 launch/train.py ...

Options: --set section.key=value (repeatable), --resume auto|PATH, --print-config.
Errors end as one line on stderr (DISTVIT_DEBUG=1 adds the traceback): distvit/errors.py.
"""
import sys

from distvit.cli import train

if __name__ == "__main__":
    sys.exit(train(sys.argv[1:]))
