from nqgen.bench.command import main

main()
