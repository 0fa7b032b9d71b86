#!/usr/bin/perl
# Doxygen's filter for the public headers: shows `detail::stored_t<R>` (R, or
# std::monostate for void) as `R`, so no name of procpool::detail appears in a
# public signature of the reference. The headers themselves are not changed.
use strict;
use warnings;
open(my $in, '<', $ARGV[0]) or die "hpp_filter.pl: cannot read $ARGV[0]: $!\n";
while (my $line = <$in>) {
  $line =~ s/detail::stored_t<R>/R/g;
  print $line;
}
