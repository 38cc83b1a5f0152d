"""python eval.py ckpt_path=<run>/checkpoints/last.ckpt [+trick=tta] [data.source=...]   (see README.md)"""

from cifar_speedrun.evaluate import main

if __name__ == "__main__":
    main()
