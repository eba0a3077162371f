"""The networks of a training run, by the names the reference's checkpoints
give them.

    params = state[networks.NETWORKS['g_ema']]   # 'ema_params'

A leaf: it imports nothing, so the commands read these names without loading
the checkpoint machinery.
"""

# Each network and the train-state field it is saved in: the EMA generator (the
# one to sample from), the trained generator, the discriminator.
NETWORKS = {'g_ema': 'ema_params', 'g': 'g_params', 'd': 'd_params'}
# The two generators: what `--which` chooses between in the commands.
GENERATOR_NETWORKS = ('g_ema', 'g')
