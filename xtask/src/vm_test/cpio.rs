//! A minimal writer for the `newc` cpio format the kernel unpacks as its initramfs.
use std::io::{self, Write};

/// `S_IFDIR`, `S_IFREG`, `S_IFLNK`, `S_IFCHR` for the mode field.
pub(crate) const DIR: u32 = 0o040_000;
pub(crate) const FILE: u32 = 0o100_000;
pub(crate) const SYMLINK: u32 = 0o120_000;
pub(crate) const CHAR_DEVICE: u32 = 0o020_000;

/// Writes entries in the order given; parents must come before their children.
#[derive(Debug)]
pub(crate) struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

/// One entry's metadata (the data, if any, is passed separately).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header<'a> {
    /// Path inside the archive, without a leading `/`.
    pub(crate) name: &'a str,
    /// File type bits ([`DIR`], [`FILE`], ...) plus permissions.
    pub(crate) mode: u32,
    /// Length of the data that follows.
    pub(crate) size: u64,
    /// Device number (major, minor) of a device node; (0, 0) otherwise.
    pub(crate) rdev: (u32, u32),
    /// Modification time, seconds since the epoch. The kernel applies it; python needs it to
    /// trust its cached bytecode (`__pycache__` records the source's mtime).
    pub(crate) mtime: u32,
}

impl<'a> Header<'a> {
    /// An entry named `name` with `mode` and `size` bytes of data; no device number, mtime 0.
    pub(crate) fn new(name: &'a str, mode: u32, size: u64) -> Self {
        Self {
            name,
            mode,
            size,
            rdev: (0, 0),
            mtime: 0,
        }
    }
}

impl<W: Write> Writer<W> {
    /// A writer appending to `out`.
    pub(crate) fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Writes a directory, symlink or device node: an entry whose data is `data` (a symlink's
    /// target; empty otherwise).
    pub(crate) fn entry(&mut self, header: Header<'_>, data: &[u8]) -> io::Result<()> {
        self.header(header)?;
        self.write(data)?;
        self.pad()
    }

    /// Writes a regular file whose `header.size` bytes come from `data`.
    pub(crate) fn file(&mut self, header: Header<'_>, data: impl io::Read) -> io::Result<()> {
        self.header(header)?;
        let copied = io::copy(&mut data.take(header.size), &mut self.out)?;
        self.offset += copied;
        if copied != header.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {copied} of {} bytes", header.name, header.size),
            ));
        }
        self.pad()
    }

    /// Writes the trailer and returns the output.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.entry(Header::new("TRAILER!!!", 0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, h: Header<'_>) -> io::Result<()> {
        let size = u32::try_from(h.size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is over 4 GiB", h.name),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if h.mode & DIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            nlink,
            h.mtime,
            size,
            0, // devmajor
            0, // devminor
            h.rdev.0,
            h.rdev.1,
            u32::try_from(h.name.len() + 1).unwrap_or(u32::MAX),
            0, // check
        ];
        let mut text = String::from("070701");
        for f in fields {
            text.push_str(&format!("{f:08x}"));
        }
        self.write(text.as_bytes())?;
        self.write(h.name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads to the format's 4-byte alignment.
    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.offset % 4) % 4;
        self.write(&[0; 3][..usize::try_from(n).unwrap_or(0)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_newc_records() {
        let mut w = Writer::new(Vec::new());
        w.entry(Header::new("bin", DIR | 0o755, 0), &[]).unwrap();
        let file = Header {
            mtime: 1,
            ..Header::new("bin/x", FILE | 0o755, 5)
        };
        w.file(file, &b"hello"[..]).unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // 110-byte header + "bin\0" = 114, padded to 116.
        assert_eq!(&out[116..122], b"070701");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn short_file_data_is_an_error() {
        let mut w = Writer::new(Vec::new());
        let file = Header::new("x", FILE | 0o644, 10);
        assert!(w.file(file, &b"abc"[..]).is_err());
    }

    #[test]
    fn header_fields_are_newc_hex_in_order() {
        let mut w = Writer::new(Vec::new());
        let dev = Header {
            rdev: (5, 1),
            mtime: 0x1234_5678,
            ..Header::new("dev/console", CHAR_DEVICE | 0o600, 0)
        };
        w.entry(dev, &[]).unwrap();
        let link = Header::new("sh", SYMLINK | 0o777, 7);
        w.entry(link, b"busybox").unwrap();
        let out = w.finish().unwrap();

        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize (with the NUL), check; then the name, padded to 4 bytes.
        let first = concat!(
            "070701",
            "00000001",
            "00002180",
            "00000000",
            "00000000",
            "00000001",
            "12345678",
            "00000000",
            "00000000",
            "00000000",
            "00000005",
            "00000001",
            "0000000c",
            "00000000",
            "dev/console\0",
            "\0\0",
        );
        assert_eq!(
            first.len(),
            124,
            "110-byte header + 12-byte name, padded to 4"
        );
        assert_eq!(&out[..124], first.as_bytes());
        let second = concat!(
            "070701", "00000002", "0000a1ff", "00000000", "00000000", "00000001", "00000000",
            "00000007", "00000000", "00000000", "00000000", "00000000", "00000003", "00000000",
            "sh\0", "\0\0\0", "busybox", "\0",
        );
        assert_eq!(second.len(), 124, "header + name padded, then data padded");
        assert_eq!(&out[124..248], second.as_bytes());
        let trailer = &out[248..];
        assert!(trailer.starts_with(b"070701"));
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
        assert_eq!(out.len() % 4, 0);
    }
}
