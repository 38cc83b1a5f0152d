"""python train.py [group=option ...] [key=value ...]   (see README.md and conf/train.yaml)"""

from cifar_speedrun.train import main

if __name__ == "__main__":
    main()
