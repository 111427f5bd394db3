//! A minimal NBD client for tests, written from the protocol document independently of the
//! server's codec: fixed newstyle handshake with `NBD_OPT_GO`, then simple requests one at a
//! time. Errors are returned, never panicked on, so tests can count failed writes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

pub struct NbdClient {
    sock: TcpStream,
    pub size: u64,
    cookie: u64,
}

fn u16_at(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32_at(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn err(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}

impl NbdClient {
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> std::io::Result<NbdClient> {
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        sock.set_nodelay(true)?;
        let mut c = NbdClient { sock, size: 0, cookie: 0 };
        let mut hello = [0u8; 18];
        c.sock.read_exact(&mut hello)?;
        if u64_at(&hello) != NBDMAGIC || u64_at(&hello[8..]) != IHAVEOPT {
            return Err(err("bad server greeting"));
        }
        // Client flags: fixed newstyle (1) and no zeroes (2).
        c.sock.write_all(&3u32.to_be_bytes())?;
        let name = export.as_bytes();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        c.sock.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            c.sock.read_exact(&mut h)?;
            if u64_at(&h) != REPLY_MAGIC {
                return Err(err("bad option reply magic"));
            }
            let kind = u32_at(&h[12..]);
            let len = u32_at(&h[16..]) as usize;
            if len > 64 * 1024 {
                return Err(err("option reply too long"));
            }
            let mut data = vec![0u8; len];
            c.sock.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16_at(&data) == 0 => c.size = u64_at(&data[2..]),
                k if k & 0x8000_0000 != 0 => {
                    return Err(err(format!("export refused ({k:#x}): {}", String::from_utf8_lossy(&data))));
                }
                _ => {}
            }
        }
        Ok(c)
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<u64> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.sock.write_all(&r)?;
        Ok(self.cookie)
    }

    fn reply(&mut self, cookie: u64) -> std::io::Result<()> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if u32_at(&h) != SIMPLE_REPLY_MAGIC || u64_at(&h[8..]) != cookie {
            return Err(err("bad reply header"));
        }
        match u32_at(&h[4..]) {
            0 => Ok(()),
            e => Err(err(format!("server error {e}"))),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let cookie = self.request(CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply(cookie)
    }

    pub fn read(&mut self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let cookie = self.request(CMD_READ, offset, len as u32, &[])?;
        self.reply(cookie)?;
        let mut buf = vec![0u8; len];
        self.sock.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let cookie = self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply(cookie)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}
