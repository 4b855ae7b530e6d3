import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["doctor"]:  # the BN doctor: plain PyTorch, no LightningCLI
        from bn_lightning.doctor.cli import main as doctor

        sys.exit(doctor(sys.argv[2:]))
    from bn_lightning.training.cli import main

    main()
