"""Hydra discovers sweepers under the `hydra_plugins` namespace: this one is cifar_speedrun's search."""
