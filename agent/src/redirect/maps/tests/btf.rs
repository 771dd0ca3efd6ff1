//! A reader of the BTF type section, enough to list structs (members) and enums (values) by name.
//!
//! aya-obj parses BTF but keeps members and enumerators crate-private, so this decodes the bytes it
//! re-encodes (`Btf::to_bytes`, what aya loads into the kernel). The format is the kernel's
//! (Documentation/bpf/btf.rst): a header, then each type as `name_off, info, size_or_type` and
//! kind-specific data, then the string section.

/// One BTF type, by kind; kinds the layout check does not look into are [`Type::Other`].
#[derive(Debug, Clone)]
pub(super) enum Type {
    Void,
    Int {
        name: String,
    },
    Array {
        elem: u32,
    },
    Struct {
        name: String,
        size: u32,
        members: Vec<Member>,
    },
    Enum {
        name: String,
        values: Vec<(String, i64)>,
    },
    Typedef {
        name: String,
        target: u32,
    },
    /// `const`, `volatile`, `restrict` or a type tag around `target`.
    Qualifier {
        target: u32,
    },
    Other {
        kind: u32,
    },
}

/// A struct member: name, type, and offset in bits (`bitfield` is non-zero for a bit field).
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub(super) name: String,
    pub(super) type_id: u32,
    pub(super) bit_offset: u32,
    pub(super) bitfield_bits: u32,
}

/// The decoded types, indexed by BTF type id (id 0 is `void`).
pub(super) struct Btf {
    pub(super) types: Vec<Type>,
}

impl Btf {
    /// Decodes BTF bytes (header, types, strings) in the host's byte order.
    pub(super) fn parse(data: &[u8]) -> Result<Self, String> {
        let mut r = Reader { data, pos: 0 };
        let magic = r.u16()?;
        if magic != 0xeb9f {
            return Err(format!("bad BTF magic {magic:#x}"));
        }
        r.pos = 4;
        let hdr_len = r.u32()? as usize;
        let (type_off, type_len) = (r.u32()? as usize, r.u32()? as usize);
        let (str_off, str_len) = (r.u32()? as usize, r.u32()? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or("BTF string section out of bounds")?;
        let name = |off: u32| -> Result<String, String> {
            let rest = strings
                .get(off as usize..)
                .ok_or(format!("BTF name offset {off} out of bounds"))?;
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
        };
        let end = hdr_len + type_off + type_len;
        let mut r = Reader {
            data: data.get(..end).ok_or("BTF type section out of bounds")?,
            pos: hdr_len + type_off,
        };
        let mut types = vec![Type::Void];
        while r.pos < end {
            let name_off = r.u32()?;
            let info = r.u32()?;
            let size_or_type = r.u32()?;
            let (kind, vlen, kflag) = ((info >> 24) & 0x1f, info & 0xffff, info >> 31 == 1);
            let ty = match kind {
                1 => {
                    r.u32()?;
                    Type::Int {
                        name: name(name_off)?,
                    }
                }
                3 => {
                    let elem = r.u32()?;
                    r.u32()?; // index type
                    r.u32()?; // element count
                    Type::Array { elem }
                }
                4 | 5 => {
                    let mut members = Vec::new();
                    for _ in 0..vlen {
                        let (member_name, type_id, offset) = (r.u32()?, r.u32()?, r.u32()?);
                        let (bit_offset, bitfield_bits) = if kflag {
                            (offset & 0xff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name: name(member_name)?,
                            type_id,
                            bit_offset,
                            bitfield_bits,
                        });
                    }
                    if kind == 5 {
                        Type::Other { kind }
                    } else {
                        Type::Struct {
                            name: name(name_off)?,
                            size: size_or_type,
                            members,
                        }
                    }
                }
                6 | 19 => {
                    let mut values = Vec::new();
                    for _ in 0..vlen {
                        let value_name = name(r.u32()?)?;
                        let low = r.u32()?;
                        let value = match (kind, kflag) {
                            (19, _) => (u64::from(r.u32()?) << 32 | u64::from(low)) as i64,
                            (_, true) => i64::from(low as i32),
                            (_, false) => i64::from(low),
                        };
                        values.push((value_name, value));
                    }
                    Type::Enum {
                        name: name(name_off)?,
                        values,
                    }
                }
                8 => Type::Typedef {
                    name: name(name_off)?,
                    target: size_or_type,
                },
                9 | 10 | 11 | 18 => Type::Qualifier {
                    target: size_or_type,
                },
                13 => {
                    for _ in 0..vlen {
                        r.u32()?;
                        r.u32()?;
                    }
                    Type::Other { kind }
                }
                14 | 17 => {
                    r.u32()?;
                    Type::Other { kind }
                }
                15 => {
                    for _ in 0..vlen * 3 {
                        r.u32()?;
                    }
                    Type::Other { kind }
                }
                2 | 7 | 12 | 16 => Type::Other { kind },
                other => return Err(format!("unknown BTF kind {other} at byte {}", r.pos)),
            };
            types.push(ty);
        }
        Ok(Self { types })
    }

    /// The type with id `id`.
    pub(super) fn get(&self, id: u32) -> Result<&Type, String> {
        self.types
            .get(id as usize)
            .ok_or(format!("no BTF type {id}"))
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_ne_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let b = self
            .data
            .get(self.pos..self.pos + n)
            .ok_or(format!("BTF truncated at byte {}", self.pos))?;
        self.pos += n;
        Ok(b)
    }
}
