from cellseg.serving.server import main

main()
