from bn_lightning.training.cli import main

if __name__ == "__main__":
    main()
