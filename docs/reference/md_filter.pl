#!/usr/bin/perl
# Doxygen's INPUT_FILTER for the Markdown pages (README.md, docs/*.md): turns
# the links that GitHub understands into links Doxygen resolves, so the same
# files read well in both places. Doxygen runs it as `md_filter.pl FILE`.
#
# - Every heading gets a label `{#page-slug}` (GitHub's slug, prefixed with
#   the page's name so labels stay unique); a level-1 heading names the page.
# - `(#slug)`, `(page.md)`, `(page.md#slug)`, `(docs/page.md)` become `@ref`s.
# - `(../examples/x.cpp)` links to the example's page of the reference;
#   `(../include/procpool/x.hpp)` to the header's page.
# - Links to other files of the repository (LICENSE, tests) keep their text only.
# Lines inside ``` fences are left alone.
use strict;
use warnings;

my $file = $ARGV[0];
(my $page = $file) =~ s{.*/}{};
$page =~ s{\.md$}{};
$page = lc $page;
my $main = $page eq 'readme';
(my $dir = $file) =~ s{[^/]*$}{};
$dir = './' unless length $dir;

sub slug {
  my ($text) = @_;
  $text = lc $text;
  $text =~ s/[^a-z0-9 _-]//g;  # GitHub drops punctuation, keeps _ and -
  $text =~ s/ /-/g;
  return $text;
}

sub label {
  my ($target_page, $anchor) = @_;
  $target_page = lc $target_page;
  return $target_page eq 'readme' ? 'index' : $target_page unless length $anchor;
  return "$target_page-$anchor";
}

# Doxygen's file-name escaping for an example's page: x_y.cpp -> x__y_8cpp-example.html.
sub example_page {
  my ($path) = @_;
  $path =~ s/_/__/g;
  $path =~ s{/}{_2}g;
  $path =~ s/\./_8/g;
  return "${path}-example.html";
}

sub rewrite_link {
  my ($text, $target) = @_;
  # An @ref's text shows code spans as raw backticks: plain text there.
  (my $plain = $text) =~ s/`//g;
  $text = $plain if $target =~ /^#/ || $target =~ /\.md(?:#|$)/;
  return "[$text](\@ref " . label($page, $1) . ")" if $target =~ /^#(.+)$/;
  if ($target =~ m{^((?:\.\./|docs/)*)([A-Za-z0-9_-]+)\.md(?:#(.+))?$}) {
    my ($path, $name, $anchor) = ($1, $2, $3 // '');
    return "[$text](\@ref " . label($name, $anchor) . ")" if -e "$dir$path$name.md";
    # A page not in this tree (yet): a plain link to where its page will be.
    return "[$text](" . lc($name) . ".html" . (length $anchor ? "#" . lc($name) . "-$anchor" : "") . ")";
  }
  return "[$text](" . example_page($1) . ")" if $target =~ m{^(?:\.\./)*examples/(.+\.cpp)$};
  return "[$text](examples.html)" if $target =~ m{^(?:\.\./)*examples/?$};
  if ($target =~ m{^(?:\.\./)*include/procpool/([a-z_]+)\.hpp$}) {
    (my $name = $1) =~ s/_/__/g;
    return "[$text](${name}_8hpp.html)";
  }
  return "[$text]($target)" if $target =~ m{^[a-z]+://} || $target =~ m{^(?:\.\./)*img/};
  return $text;  # a file of the repository the reference does not hold
}

my $fence = 0;
my $first_heading = 1;
open(my $in, "<", $file) or die "md_filter.pl: cannot read $file: $!\n";
while (my $line = <$in>) {
  if ($line =~ /^\s*```/) {
    $fence = !$fence;
    print $line;
    next;
  }
  if (!$fence) {
    if ($line =~ /^(#{1,6})\s+(.*?)\s*$/) {
      my ($hashes, $title) = ($1, $2);
      # Doxygen 1.9.4 shows code spans in a labelled heading as raw <tt>
      # tags: headings are plain text.
      $title =~ s/`//g;
      if ($first_heading && length($hashes) == 1) {
        $line = $main ? "$hashes $title\n" : "$hashes $title {#$page}\n";
      } else {
        $line = "$hashes $title {#" . label($page, slug($title)) . "}\n";
      }
      $first_heading = 0;
    }
    # Doxygen 1.9.4 misreads, inside a table row, a code span that holds a
    # quote or starts with '-' (it garbles the row); HTML <code> reads the same.
    if ($line =~ /^\|/) {
      my @parts = split /`/, $line, -1;  # odd parts are code spans
      for (my $i = 1; $i < $#parts; $i += 2) {
        next unless $parts[$i] =~ /^-|'/;
        (my $c = $parts[$i]) =~ s/&/&amp;/g;
        $c =~ s/</&lt;/g;
        $c =~ s/>/&gt;/g;
        $parts[$i] = "\x00<code>$c</code>\x00";
      }
      $line = '';
      for my $i (0 .. $#parts) {
        $line .= $parts[$i];
        $line .= '`' if $i < $#parts && $parts[$i] !~ /\x00$/ && $parts[$i + 1] !~ /^\x00/;
      }
      $line =~ s/\x00//g;
    }
    # [text](target), but not ![image](...) handled above, nor code like `[](int n)`.
    $line =~ s{(?<![!\]\`\w])\[([^\]\`]+|[^\]]*\`[^\]]*\`[^\]]*)\]\(([^()\s]+)\)}{rewrite_link($1, $2)}ge;
  }
  print $line;
}
