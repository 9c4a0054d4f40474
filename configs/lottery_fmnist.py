"""Lottery tickets on Fashion-MNIST: LeNet-300-100, 10 rounds at 20% per round (output layer
10%), rewinding to initialisation, with the re-initialisation and random-pruning controls,
5 fixed epochs per round and 3 seeds: about 9 minutes on 2 busy CPU cores (3 per seed).

`python train.py --config configs/lottery_fmnist.py [--config.epochs=3 ...]` writes results.md,
results.json and accuracy_vs_weights.png into workdir/lottery_fmnist.
"""

from moejax.tasks.lottery import LotteryConfig

# The program this file configures (see train.py's TASKS); files without one train the LM.
TASK = "lottery"


def get_config() -> LotteryConfig:
    return LotteryConfig(
        model="lenet",
        rounds=10,
        prune_rate=0.2,
        output_prune_rate=0.1,
        epochs=5,
        batch_size=128,
        learning_rate=1.2e-3,
        rewind_step=0,
        seeds="0,1,2",
    )
