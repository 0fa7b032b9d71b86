#!/usr/bin/perl
# Doxygen's filter for the public headers; the headers themselves are not
# changed, and line numbers stay as they are.
# - Shows `detail::stored_t<R>` (R, or std::monostate for void) as `R`, so no
#   name of procpool::detail appears in a public signature of the reference.
# - Marks `@private` a nested class defined outside its class
#   (`struct future<R>::state {`): in procpool's headers those are always
#   private, but Doxygen would list them as public.
use strict;
use warnings;
open(my $in, '<', $ARGV[0]) or die "hpp_filter.pl: cannot read $ARGV[0]: $!\n";
my @lines = <$in>;
for my $i (0 .. $#lines) {
  $lines[$i] =~ s/detail::stored_t<R>/R/g;
  next unless $lines[$i] =~ /^(?:class|struct) \w+(?:<[^<>]*>)?::\w+\s*(?:\{|:|$)/;
  my $j = $i - 1;
  $j-- while $j >= 0 && $lines[$j] =~ /^template\s*</;
  if ($j >= 0 && $lines[$j] =~ m{^\s*///}) {
    $lines[$j] =~ s/\s*$/ \@private\n/;
  } else {
    $lines[$i] = "/// \@private\n$lines[$i]";  # undocumented: one line more
  }
}
print @lines;
