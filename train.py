from lit_rlhf.cli import main

main()
