from speedtrain.cli import main

main()
