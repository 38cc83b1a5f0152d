"""cifar_speedrun."""
