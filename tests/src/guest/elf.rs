//! Just enough ELF64 (little-endian) reading for the kit: find a named section (a kernel
//! module's `.modinfo`) and tell whether a binary needs a dynamic loader (busybox must not).
//! Written by hand because it is ~60 lines and no ELF crate is a dependency of this crate.

use anyhow::{bail, Context, Result};

const PT_INTERP: u32 = 3;

/// The contents of the section called `name`, if the file has one.
pub(crate) fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    check_header(elf)?;
    let shoff = usize_at(elf, 0x28)?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    let header = |index: usize| -> Result<usize> {
        index
            .checked_mul(shentsize)
            .and_then(|off| off.checked_add(shoff))
            .context("ELF section header offset overflows")
    };
    let body = |hdr: usize| -> Result<&'a [u8]> {
        let offset = usize_at(elf, hdr.saturating_add(0x18))?;
        let size = usize_at(elf, hdr.saturating_add(0x20))?;
        offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .context("ELF section lies outside the file")
    };
    let names = body(header(shstrndx)?)?;
    for index in 0..shnum {
        let hdr = header(index)?;
        let name_off = usize::try_from(u32_at(elf, hdr)?)?;
        let section_name = names
            .get(name_off..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .context("ELF section name lies outside the string table")?;
        if section_name == name.as_bytes() {
            return body(hdr).map(Some);
        }
    }
    Ok(None)
}

/// Whether the executable asks for a program interpreter (i.e. is dynamically linked).
pub(crate) fn has_interpreter(elf: &[u8]) -> Result<bool> {
    check_header(elf)?;
    let phoff = usize_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for index in 0..phnum {
        let hdr = index
            .checked_mul(phentsize)
            .and_then(|off| off.checked_add(phoff))
            .context("ELF program header offset overflows")?;
        if u32_at(elf, hdr)? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

fn check_header(elf: &[u8]) -> Result<()> {
    match elf.get(..6) {
        Some([0x7f, b'E', b'L', b'F', 2, 1]) => Ok(()),
        _ => bail!("not a 64-bit little-endian ELF file"),
    }
}

fn bytes_at<const N: usize>(elf: &[u8], offset: usize) -> Result<[u8; N]> {
    offset
        .checked_add(N)
        .and_then(|end| elf.get(offset..end))
        .and_then(|b| <[u8; N]>::try_from(b).ok())
        .with_context(|| format!("ELF file truncated at offset {offset:#x}"))
}

fn u16_at(elf: &[u8], offset: usize) -> Result<u16> {
    bytes_at(elf, offset).map(u16::from_le_bytes)
}

fn u32_at(elf: &[u8], offset: usize) -> Result<u32> {
    bytes_at(elf, offset).map(u32::from_le_bytes)
}

fn usize_at(elf: &[u8], offset: usize) -> Result<usize> {
    Ok(usize::try_from(
        bytes_at(elf, offset).map(u64::from_le_bytes)?,
    )?)
}
