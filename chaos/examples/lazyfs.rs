//! Mounts a lazyfs layer by hand: `lazyfs BACKING MOUNTPOINT`, then one command a line on stdin:
//! `cut`, `torn SEED`, `stats`, `quit` (or end of input). For trying a node on the layer.

use std::io::BufRead;
use std::path::Path;

use tandem_chaos::lazyfs::LazyFs;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: lazyfs BACKING MOUNTPOINT");
    let fs = LazyFs::mount(Path::new(&args[1]), Path::new(&args[2]))?;
    println!("mounted {}", fs.mountpoint().display());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["cut"] => println!("{:?}", fs.power_cut()),
            ["torn", seed] => println!("{:?}", fs.power_cut_torn(seed.parse()?)),
            ["stats"] => println!("{:?}", fs.stats()),
            ["quit"] => break,
            [] => {}
            _ => println!("commands: cut, torn SEED, stats, quit"),
        }
    }
    println!("{:?}", fs.stats());
    fs.unmount()
}
