// goracle serves the Go vmhost wire on a unix socket: goracle SOCKET STATE SSH_PORT BACKEND.
// It prints "serving" once listening and serves until killed.
package main

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"goracle/vmhost"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: goracle SOCKET STATE SSH_PORT BACKEND")
		os.Exit(2)
	}
	port, err := strconv.Atoi(os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	vm := vmhost.VM{State: os.Args[2], SSHPort: port, Backend: os.Args[4]}
	ln, err := net.Listen("unix", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("serving")
	for {
		conn, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		go vm.Handle(conn)
	}
}
